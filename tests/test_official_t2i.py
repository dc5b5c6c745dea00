"""The official T2I vision components (tokenizer, diffusion head, projector) load strictly into our modules."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_heads import official_shapes  # the head's keys and shapes as the reference lists them

from bitdance.models.autoencoder import TOKENIZER_PRESETS, ImageTokenizer
from bitdance.models.autoencoder_official import save_official
from bitdance.models.transformer import patch_order
from bitdance.official_t2i import load_t2i_components, sincos_1d, sincos_positions
from bitdance.utils import UserError

K, D, P = 8, 128, 4  # bits per token, LLM (= head) width, tokens per patch
HEAD_KWARGS = {"ch_target": K, "ch_cond": D, "ch_latent": D, "depth_latent": 2, "depth_adanln": 1, "parallel_num": P,
               "use_swiglu": True, "time_schedule": "logit_normal", "time_shift": 1.0, "P_mean": -0.8, "P_std": 0.8,
               "diff_batch_mul": 1}


def write_t2i_folder(root, head_kwargs=HEAD_KWARGS, head_shapes=None, projector_width=D, dtype=torch.float32):
    """A tiny folder in the release layout, every tensor random and written from the reference's key list."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(dataclasses.replace(TOKENIZER_PRESETS["tiny"](), z_channels=K))
    save_official(tokenizer, root)  # ae_config.json + ae.safetensors
    (root / "vision_head_config.json").write_text(json.dumps(head_kwargs))
    shapes = head_shapes or official_shapes(K, D, D, 2, 1, P)
    save_file({k: (0.1 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()},
              root / "vision_head.safetensors")
    proj = {"fc1.weight": (projector_width, K), "fc1.bias": (projector_width,),
            "fc2.weight": (projector_width, projector_width), "fc2.bias": (projector_width,)}
    save_file({k: (0.1 * torch.randn(s, generator=g)).to(dtype) for k, s in proj.items()},
              root / "projector.safetensors")
    (root / "config.json").write_text("{}")  # the LLM's files sit beside them and are not read
    return root


def test_components_load_strictly_and_work(tmp_path):
    from safetensors.torch import load_file

    parts = load_t2i_components(write_t2i_folder(tmp_path))
    head_file = load_file(tmp_path / "vision_head.safetensors")
    assert parts.parallel == P and parts.head.net.res_blocks[0].attn.n_head == D // 128
    assert all(torch.equal(v, head_file[k]) for k, v in parts.head.state_dict().items())
    # T2I head output is bounded: x_hat = 2 sigmoid(out) - 1
    x_hat = parts.head.forward_net(torch.randn(3, P, K), torch.rand(3), torch.randn(3, P, D))
    assert x_hat.shape == (3, P, K) and x_hat.abs().max() < 1
    bits = parts.head.sample(torch.randn(2, P, D), num_steps=3, cfg_scale=7.5, generator=torch.Generator())
    assert bits.shape == (1, P, K) and bits.abs().eq(1).all()
    # the projector is Linear -> GELU(tanh) -> Linear
    proj = load_file(tmp_path / "projector.safetensors")
    x = torch.randn(5, K).sign()
    want = F.linear(F.gelu(F.linear(x, proj["fc1.weight"], proj["fc1.bias"]), approximate="tanh"),
                    proj["fc2.weight"], proj["fc2.bias"])
    assert torch.allclose(parts.projector(x), want, atol=1e-6)
    assert parts.tokenizer.config.z_channels == K


@pytest.mark.parametrize("change, message", [
    (dict(head_kwargs=HEAD_KWARGS | {"use_swiglu": False}), "use_swiglu=false"),
    (dict(head_kwargs={k: v for k, v in HEAD_KWARGS.items() if k != "ch_latent"}), "lacks ch_latent"),
    (dict(head_kwargs=HEAD_KWARGS | {"parallel_num": 1}), "patch head"),
    (dict(head_kwargs={k: v for k, v in HEAD_KWARGS.items() if k != "use_swiglu"}), "no use_swiglu"),
    (dict(head_kwargs=HEAD_KWARGS | {"ch_latent": None}), "ch_latent=None is not a whole number"),
    (dict(head_kwargs=HEAD_KWARGS | {"ch_target": 16}), "the head predicts 16-bit tokens, the tokenizer has 8"),
    (dict(head_kwargs=HEAD_KWARGS | {"depth_latent": 3, "depth_adanln": 3}), "vision_head.safetensors does not"),
    (dict(head_shapes={k: v for k, v in official_shapes(K, D, D, 2, 1, P).items() if "res_blocks.1.w2" not in k}),
     "missing net.res_blocks.1.w2"),
    (dict(projector_width=2 * D), "condition width 128 is not the projector's LLM width 256"),
])
def test_mismatched_folders_are_refused_with_one_line(tmp_path, change, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as e:
        load_t2i_components(write_t2i_folder(tmp_path, **change))
    assert "\n" not in str(e.value)


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_t2i_components(tmp_path / "nope")
    write_t2i_folder(tmp_path)
    (tmp_path / "projector.safetensors").unlink()
    with pytest.raises(UserError, match="projector.safetensors"):
        load_t2i_components(tmp_path)
    (tmp_path / "vision_head_config.json").unlink()
    with pytest.raises(UserError, match="no vision_head_config.json"):
        load_t2i_components(tmp_path)


def test_sincos_positions_are_column_then_row_in_patch_order():
    h, w, dim = 4, 6, 16
    table = sincos_positions(h, w, dim, parallel=4)  # (24, 16)
    assert table.shape == (h * w, dim)
    raster = table[torch.argsort(patch_order(h, w, 4))]  # back to raster order
    r, c = 2, 5
    row = raster[r * w + c]
    # first half: the column (4 sines, then 4 cosines, omega_i = 1e4^(-i/4)); second half: the row
    assert math.isclose(row[0].item(), math.sin(c), abs_tol=1e-6) and math.isclose(row[4].item(), math.cos(c),
                                                                                    abs_tol=1e-6)
    assert math.isclose(row[1].item(), math.sin(c / 10), abs_tol=1e-6)
    assert math.isclose(row[8].item(), math.sin(r), abs_tol=1e-6) and math.isclose(row[12].item(), math.cos(r),
                                                                                    abs_tol=1e-6)
    assert torch.allclose(sincos_1d(torch.tensor([0.0]), 8), torch.tensor([[0.0] * 4 + [1.0] * 4]))
    with pytest.raises(UserError):
        sincos_positions(2, 2, 6)
    for h, w, parallel in [(4, 4, 8), (6, 4, 16)]:  # no such patch; a grid the 4x4 patch does not tile
        with pytest.raises(UserError, match="cannot be cut into patches"):
            sincos_positions(h, w, 16, parallel)


@pytest.mark.parametrize("parallel", [16, 64])
def test_the_release_config_gives_our_t2i_preset(parallel):
    from bitdance.models.diffusion_head import HEAD_PRESETS
    from bitdance.official_t2i import head_config_from_official

    release = HEAD_KWARGS | {"ch_target": 32, "ch_cond": 5120, "ch_latent": 5120, "depth_latent": 6,
                             "depth_adanln": 2, "parallel_num": parallel}  # ref §6.2
    assert head_config_from_official(release, "x") == HEAD_PRESETS[f"t2i-14b-{parallel}x"]()


def test_weights_keep_the_stored_dtype_unless_asked(tmp_path):
    """The release stores the head and projector in bf16 and the official pipeline runs them so; fp32 on request."""
    from safetensors.torch import load_file

    write_t2i_folder(tmp_path, dtype=torch.bfloat16)
    stored = load_file(tmp_path / "vision_head.safetensors")
    as_stored = load_t2i_components(tmp_path)
    assert {p.dtype for p in as_stored.head.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in as_stored.projector.parameters()} == {torch.bfloat16}
    bits = torch.where(torch.randn(2, 4, K) > 0, 1.0, -1.0)  # the fp32 bits the sampler hands it
    assert as_stored.projector(bits).dtype == torch.bfloat16
    fp32 = load_t2i_components(tmp_path, dtype=torch.float32)
    head_state = fp32.head.state_dict()
    assert all(torch.equal(v, stored[k].float()) and v.dtype == torch.float32 for k, v in head_state.items())
    assert fp32.tokenizer.encoder.conv_in.weight.dtype == torch.float32
