import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bitdance.models.autoencoder import (
    TOKENIZER_PRESETS,
    AdaptiveGroupNorm,
    ImageTokenizer,
    TokenizerConfig,
    depth_to_space_dcr,
)
from bitdance.models.autoencoder_official import (
    OFFICIAL_CONFIG_NAME,
    OFFICIAL_WEIGHTS_NAME,
    official_ae_config,
    official_key_shapes,
    preset_name,
    random_official_state_dict,
    save_official,
)
from bitdance.models.quantizer import bits_to_indices
from bitdance.utils import UserError, count_parameters, save_checkpoint, write_json


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(n=2, c=3, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=_gen(seed)) * 2 - 1


def _tiny(**kw):
    return dataclasses.replace(TOKENIZER_PRESETS["tiny"](), **kw)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return ImageTokenizer(_tiny(**kw))


def test_d16c32_has_460_3m_parameters_on_meta():
    with torch.device("meta"):
        m = ImageTokenizer(TOKENIZER_PRESETS["d16c32"]())
    assert round(count_parameters(m) / 1e6, 1) == 460.3
    assert round(count_parameters(m.encoder) / 1e6, 1) == 198.9
    assert round(count_parameters(m.decoder) / 1e6, 1) == 261.4
    assert m.downsample_factor == 16 and m.bits_per_token == 32 and m.token_grid(256) == (16, 16)


@pytest.mark.parametrize("name", list(TOKENIZER_PRESETS))
def test_module_tree_is_the_official_key_layout(name):
    cfg = TOKENIZER_PRESETS[name]()
    with torch.device("meta"):
        sd = ImageTokenizer(cfg).state_dict()
    spec = official_key_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec


def test_official_d16c32_shapes_from_the_reference():
    s = official_key_shapes(TOKENIZER_PRESETS["d16c32"]())
    assert s["encoder.conv_in.weight"] == (256, 3, 3, 3)
    assert s["encoder.conv_out.weight"] == (32, 1024, 1, 1)
    assert s["decoder.conv_in.weight"] == (1024, 32, 3, 3)
    assert s["decoder.conv_out.weight"] == (3, 256, 3, 3)
    assert s["decoder.up.4.upsample.conv1.weight"] == (4096, 1024, 3, 3)
    assert s["decoder.up.1.upsample.conv1.weight"] == (1024, 256, 3, 3)
    assert "decoder.up.0.upsample.conv1.weight" not in s and "encoder.down.4.downsample.weight" not in s
    # adaptive.{l} normalises the width entering level l (coming down from level l+1)
    assert [s[f"decoder.adaptive.{lvl}.gamma.weight"][0] for lvl in range(5)] == [256, 512, 512, 1024, 1024]
    assert s["encoder.down.1.block.0.conv1.weight"] == (256, 256, 3, 3)
    assert s["encoder.down.2.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)


def test_encode_gives_exact_pm1_codes_and_matching_indices():
    m = _model().eval()
    x = _images()
    codes = m.encode(x)
    assert codes.shape == (2, 16, 8, 8)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(m.encode_indices(x), bits_to_indices(codes, 8))
    assert torch.equal(m.indices_to_codes(m.encode_indices(x)), codes)
    assert m.decode(codes).shape == x.shape
    with pytest.raises(UserError, match="divisible"):
        m.encode(_images(size=15))


def test_straight_through_gradient_reaches_the_encoder():
    m = _model().train()
    out = m(_images())
    assert set(out.codes.detach().unique().tolist()) == {-1.0, 1.0}
    F.mse_loss(out.reconstruction, _images()).backward()  # reconstruction only, no aux loss
    g = m.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_adaptive_group_norm_uses_unbiased_std():
    agn = AdaptiveGroupNorm(z_channels=4, channels=32)
    z = torch.randn(2, 4, 3, 5, generator=_gen())
    x = torch.randn(2, 32, 6, 6, generator=_gen(1))
    flat = z.reshape(2, 4, 15)
    mean = flat.sum(-1) / 15
    std = (((flat - mean[..., None]) ** 2).sum(-1) / 14 + 1e-6).sqrt()  # divide by N - 1
    gn = F.group_norm(x, 32, eps=1e-6)
    expected = agn.gamma(std)[..., None, None] * gn + agn.beta(mean)[..., None, None]
    assert torch.allclose(agn(x, z), expected, atol=1e-5)
    biased = (((flat - mean[..., None]) ** 2).sum(-1) / 15 + 1e-6).sqrt()
    with_biased = agn.gamma(biased)[..., None, None] * gn + agn.beta(mean)[..., None, None]
    assert not torch.allclose(agn(x, z), with_biased)


def test_depth_to_space_is_dcr_not_pixel_shuffle():
    x = torch.arange(2 * 8 * 3 * 3, dtype=torch.float32).view(2, 8, 3, 3)
    y = depth_to_space_dcr(x, 2)
    c = 2  # output channels
    for co in range(c):
        for i in range(2):
            for j in range(2):
                assert torch.equal(y[:, co, i::2, j::2], x[:, (i * 2 + j) * c + co])
    assert not torch.equal(y, F.pixel_shuffle(x, 2))


def test_gan_decoder_noise_comes_from_the_generator():
    m = _model(gan_decoder=True).eval()
    assert m.decoder.conv_in.weight.shape[1] == 2 * 16
    codes = m.encode(_images())
    a = m.decode(codes, generator=_gen(7))
    b = m.decode(codes, generator=_gen(7))
    c = m.decode(codes, generator=_gen(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_save_and_load_pretrained_gives_identical_outputs(tmp_path):
    m = _model().eval()
    m.save_pretrained(tmp_path / "tok")
    back = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert back.config == m.config
    x = _images()
    assert torch.equal(back.decode(back.encode(x)), m.decode(m.encode(x)))


def test_random_official_state_dict_loads_strictly():
    for cfg in (_tiny(), _tiny(gan_decoder=True, z_channels=32), _tiny(ch_mult=(1, 1, 2), num_res_blocks=2)):
        sd = random_official_state_dict(cfg, _gen())
        ImageTokenizer(cfg).load_state_dict(sd, strict=True)


def _reference_outputs(model, x):
    return model.decode(model.encode(x))


def test_official_pt_loader_infers_config_strips_prefix_and_ignores_buffers(tmp_path, caplog):
    cfg = _tiny(ch_mult=(1, 1, 2))
    sd = random_official_state_dict(cfg, _gen())
    blob = {f"vae.{k}": v for k, v in sd.items()}
    blob["vae.quantize.codebook"] = torch.ones(256, 8)  # a non-parameter quantizer buffer
    blob["cls_embedding.weight"] = torch.zeros(3, 4)  # the rest of an ImageNet BitDance model
    save_checkpoint({"state_dict": blob}, tmp_path / "ae.pt")
    m = ImageTokenizer.from_official(tmp_path / "ae.pt")
    # an autoencoder training checkpoint: its loss modules' weights are set aside, with a note
    training = {**sd, "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
                "loss.logits_real_ema": torch.zeros(())}
    save_checkpoint({"state_dict": training}, tmp_path / "ae_training.pt")
    with caplog.at_level(logging.WARNING, logger="bitdance.official"):
        trained = ImageTokenizer.from_official(tmp_path / "ae_training.pt")
    assert "ignoring keys outside the tokenizer (loss.*)" in caplog.text
    assert torch.equal(_reference_outputs(trained, _images()), _reference_outputs(m, _images()))
    c = m.config
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels) == (32, (1, 1, 2), 1, 16)
    ref = ImageTokenizer(cfg).eval()
    ref.load_state_dict(sd)
    assert torch.equal(_reference_outputs(m, _images()), _reference_outputs(ref, _images()))
    assert preset_name(ImageTokenizer.from_official(_write_pt(tmp_path, _tiny())).config) == "tiny"
    back = ImageTokenizer.from_official(save_official(m, tmp_path / "exported"))  # official folder round trip
    assert torch.equal(_reference_outputs(back, _images()), _reference_outputs(ref, _images()))


def _write_pt(tmp_path, cfg):
    save_checkpoint({"state_dict": random_official_state_dict(cfg, _gen(1))}, tmp_path / "t.pt")
    return tmp_path / "t.pt"


def test_official_safetensors_pair_loader(tmp_path):
    cfg = _tiny(gan_decoder=True)
    sd = random_official_state_dict(cfg, _gen())
    folder = tmp_path / "BitDance-14B"
    folder.mkdir()
    write_json(official_ae_config(cfg), folder / OFFICIAL_CONFIG_NAME)
    save_file(sd, str(folder / OFFICIAL_WEIGHTS_NAME))
    m = ImageTokenizer.from_official(folder)
    assert m.config.gan_decoder and m.config.z_channels == 16 and m.config.resolution == 16
    again = ImageTokenizer.from_official(folder / OFFICIAL_CONFIG_NAME)  # the file pair, named by its config
    codes = m.encode(_images())
    assert torch.equal(m.decode(codes, generator=_gen(3)), again.decode(codes, generator=_gen(3)))
    # HF tokenizer-repo naming: <name>.safetensors + <name>_config.json
    write_json(official_ae_config(cfg), tmp_path / "ae_d1_config.json")
    buffers = {"quantize.codebook": torch.ones(256, 8), "quantize.mask_0": torch.arange(8)}  # GFQ buffers
    save_file({**sd, **buffers}, str(tmp_path / "ae_d1.safetensors"))
    assert ImageTokenizer.from_official(tmp_path / "ae_d1.safetensors").config == m.config
    # the HF tokenizer repo holds several: the folder alone is ambiguous, and the error names the choices
    save_file(sd, str(tmp_path / "ae_d2.safetensors"))
    with pytest.raises(UserError, match=r"several tokenizers \(ae_d1.safetensors, ae_d2.safetensors\)"):
        ImageTokenizer.from_official(tmp_path)


def test_mismatched_official_files_raise_user_errors(tmp_path):
    cfg = _tiny()
    sd = random_official_state_dict(cfg, _gen())
    folder = tmp_path / "wrong_cfg"
    folder.mkdir()
    write_json(official_ae_config(_tiny(z_channels=32)), folder / OFFICIAL_CONFIG_NAME)  # says 32 bits
    save_file(sd, str(folder / OFFICIAL_WEIGHTS_NAME))
    with pytest.raises(UserError, match="does not match.*encoder.conv_out.weight has shape"):
        ImageTokenizer.from_official(folder)
    bad = dict(sd)
    del bad["decoder.adaptive.0.beta.bias"]
    save_checkpoint({"state_dict": bad}, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="missing decoder.adaptive.0.beta.bias"):
        ImageTokenizer.from_official(tmp_path / "missing.pt")
    generator_only = {"layers.0.attention.wqkv.weight": torch.zeros(3, 3)}
    save_checkpoint({"state_dict": generator_only}, tmp_path / "gen.pt")
    with pytest.raises(UserError, match="not an official BitDance tokenizer"):
        ImageTokenizer.from_official(tmp_path / "gen.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        ImageTokenizer.from_official(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        ImageTokenizer.from_official(tmp_path / "nope")


def test_vq_tokenizer_has_the_same_bits_per_token():
    m = _model(quantizer="vq").train()
    out = m(_images())
    assert out.codes.shape == (2, 16, 8, 8) and out.quant.indices.shape == (2, 2, 8, 8)
    assert out.quant.indices.max() < 256 and m.bits_per_token == 16
    assert torch.allclose(m.indices_to_codes(out.quant.indices), out.codes, atol=1e-6)
    assert out.quant.loss > 0 and out.quant.codebook_loss > 0


def test_a_few_adam_steps_lower_the_reconstruction_loss():
    m = _model(seed=1).train()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    x = _images(n=4, seed=3)
    losses = []
    for _ in range(12):
        out = m(x)
        rec = F.mse_loss(out.reconstruction, x)
        opt.zero_grad()
        (rec + out.quant.loss).backward()
        opt.step()
        losses.append(rec.item())
    assert min(losses[-3:]) < 0.7 * losses[0]


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="multiples of 32"):
        TokenizerConfig(ch=48)
    with pytest.raises(UserError, match="groups of 8"):
        TokenizerConfig(z_channels=12)
    with pytest.raises(UserError, match="unknown quantizer"):
        TokenizerConfig(quantizer="fsq")


def test_vq_tokenizer_weights_load_from_a_safetensors_file(tmp_path):
    m = _model(quantizer="vq").eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "vq.safetensors"))
    back = ImageTokenizer.from_official(tmp_path / "vq.safetensors")  # config inferred: 3-D codebook -> vq
    assert back.config.quantizer == "vq" and back.quantize.usage_ema.device.type == "cpu"
    assert torch.equal(back.encode_indices(_images()), m.encode_indices(_images()))


def test_official_folder_round_trip_keeps_a_non_default_group_size(tmp_path):
    m = _model(group_size=4).eval()
    back = ImageTokenizer.from_official(save_official(m, tmp_path / "g4"))
    assert back.config == m.config and back.config.group_size == 4
    assert torch.equal(back.encode_indices(_images()), m.encode_indices(_images()))  # 4 groups of 4 bits
    # the default group size writes no extra key: the official pipeline's VQModel(**ae_config) would refuse one
    assert "num_codebooks" not in official_ae_config(_tiny())


def test_bf16_model_forward_runs_on_cpu():
    """forward used to hand the quantizer's fp32 codes to a bf16 decoder ("Input type (float) and bias type")."""
    m = _model().to(torch.bfloat16).train()
    out = m(_images(n=1))
    assert out.reconstruction.dtype == torch.bfloat16 and out.reconstruction.shape == (1, 3, 16, 16)
    assert torch.isfinite(out.reconstruction.float()).all()


def test_encode_builds_no_graph_and_never_restarts_vq_codewords():
    m = _model(quantizer="vq").train()  # train mode: a forward pass would restart unused codewords
    book = m.quantize.codebook.detach().clone()
    codes = m.encode(_images())
    assert not codes.requires_grad and not m.encode_indices(_images()).requires_grad
    assert torch.equal(m.quantize.codebook, book)
