import math

import pytest
import torch

from bitdance.losses import (
    LPIPS,
    DiscriminatorConfig,
    LeCam,
    LPIPSConfig,
    PatchDiscriminator,
    generator_loss,
    hinge_d_loss,
)
from bitdance.metrics import PSNR_CAP_DB, CodeStats, ReconstructionMeter, psnr, ssim
from bitdance.utils import UserError


def _images(seed=0, shape=(3, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.6 - 0.8  # in [-0.8, 0.8]: no clamping for small offsets


def test_psnr_identical_is_capped_and_offset_has_known_value():
    x = _images()
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP_DB))
    # +0.2 in [-1, 1] is +0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(x, x + 0.2), torch.full((3,), 20.0), atol=1e-4)
    # per image, then mean: one image with offset 0.02 (40 dB), the others identical (capped)
    y = x.clone()
    y[0] += 0.02
    assert torch.allclose(psnr(x, y), torch.tensor([40.0, PSNR_CAP_DB, PSNR_CAP_DB]), atol=1e-3)


def test_ssim_is_one_for_identical_and_drops_with_noise():
    x = _images()
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    light = ssim(x, x + 0.05 * torch.randn(x.shape, generator=g))
    heavy = ssim(x, x + 0.4 * torch.randn(x.shape, generator=g))
    assert (light < 1).all() and (heavy < light).all()
    # a brightness shift leaves structure intact: SSIM stays far above the noisy case
    assert (ssim(x, x + 0.1) > heavy).all()


def test_ssim_matches_torchmetrics_on_the_valid_region():
    tm = pytest.importorskip("torchmetrics.functional.image")
    x = _images(2)
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    _, full = tm.structural_similarity_index_measure((y + 1) / 2, (x + 1) / 2, data_range=1.0, reduction="none",
                                                     return_full_image=True)
    # torchmetrics reflect-pads; its map cropped by the window radius is the 'valid' SSIM of Wang et al.
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert torch.allclose(ssim(y, x), ref, atol=1e-5)


def test_bit_usage_and_group_perplexity():
    codes = -torch.ones(2, 8, 2, 2)
    codes[:, 0] = 1  # bit 0 always on
    stats = CodeStats(group_size=4)
    stats.update(codes)
    out = stats.compute()
    assert out["bit_usage"] == pytest.approx(1 / 8)
    assert out["bit_usage_per_bit"][0] == 1.0 and out["bit_usage_per_bit"][1] == 0.0
    assert out["perplexity_per_group"] == [1.0, 1.0] and out["bits_per_group"] == 4

    # every one of the 16 codes of a 4-bit group used equally often -> perplexity 16
    idx = torch.arange(16)
    bits = ((idx[:, None] >> torch.arange(4)) & 1).float() * 2 - 1  # (16, 4)
    uniform = bits.T.reshape(1, 4, 4, 4)
    stats = CodeStats(group_size=4)
    stats.update(uniform)
    assert stats.compute()["perplexity_per_group"][0] == pytest.approx(16.0)
    assert stats.compute()["bit_usage"] == pytest.approx(0.5)
    # the same tokens given as indices (what a VQ tokenizer yields) give the same statistics
    from_indices = CodeStats(group_size=4)
    from_indices.update_indices(idx.view(1, 1, 4, 4))
    assert from_indices.compute() == stats.compute()


def test_reconstruction_meter_averages_per_image():
    x = _images()
    meter = ReconstructionMeter(group_size=4)
    meter.update(x[:2], x[:2] + 0.2)
    meter.update(x[2:], x[2:] + 0.02)
    out = meter.compute()
    assert out["num_images"] == 3 and out["psnr"] == pytest.approx((20 + 20 + 40) / 3, abs=1e-3)
    assert 0 < out["ssim"] <= 1


def test_discriminator_losses_and_lecam():
    d = PatchDiscriminator(DiscriminatorConfig(in_channels=1, ndf=8))
    logits = d(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 1, 2, 2)
    with pytest.raises(UserError):
        PatchDiscriminator(DiscriminatorConfig(norm="layer"))
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake).item() == 0.0  # both beyond the margin
    assert hinge_d_loss(fake, real).item() == pytest.approx(3.0)
    assert generator_loss(torch.zeros(3)).item() == pytest.approx(math.log(2))
    assert generator_loss(torch.ones(3), "hinge").item() == -1.0

    lecam = LeCam(decay=0.5)
    assert lecam(real, fake).item() == pytest.approx(16 + 16)  # EMAs start at the first batch: relu(2+2)^2 x2
    lecam(torch.zeros(4), torch.zeros(4))
    assert lecam.ema_real.item() == pytest.approx(1.0) and lecam.ema_fake.item() == pytest.approx(-1.0)


def test_lpips_builds_offline_and_loads_a_local_file(tmp_path):
    net = LPIPS(LPIPSConfig())
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(net(x, x), torch.zeros(2))
    y = x.flip(-1)
    state = {f"lin{j}.model.1.weight": net.lins[j].weight.abs() for j in range(5)}  # official LPIPS head names
    state |= {f"features.{k}": v for k, v in net.features.state_dict().items()}
    torch.save(state, tmp_path / "lpips_vgg.pt")
    loaded = LPIPS(LPIPSConfig(str(tmp_path / "lpips_vgg.pt")))
    assert (loaded(x, y) > 0).all()
    with pytest.raises(UserError, match="not found"):
        LPIPS(LPIPSConfig(str(tmp_path / "missing.pt")))

    # lpips.LPIPS(net="vgg").state_dict(): VGG in slices that keep torchvision's indices, plus its scaling layer
    slices = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
    package = {f"lin{j}.model.1.weight": net.lins[j].weight.abs() for j in range(5)}
    package |= {f"scaling_layer.{n}": torch.zeros(1, 3, 1, 1) for n in ("shift", "scale")}
    package |= {f"net.slice{s}.{k}": v for k, v in net.features.state_dict().items()
                for s, idx in slices.items() if int(k.split(".")[0]) in idx}
    torch.save(package, tmp_path / "lpips_package.pt")
    from_package = LPIPS(LPIPSConfig(str(tmp_path / "lpips_package.pt")))
    assert torch.equal(from_package(x, y), loaded(x, y))
    heads_only = {f"lin{j}.model.1.weight": net.lins[j].weight for j in range(5)}  # lpips' own vgg.pth
    torch.save(heads_only, tmp_path / "vgg.pth")
    with pytest.raises(UserError, match="holds no VGG16 weights"):
        LPIPS(LPIPSConfig(str(tmp_path / "vgg.pth")))
    torch.save({**state, "lins.0.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="lins.0.weight has shape"):
        LPIPS(LPIPSConfig(str(tmp_path / "bad.pt")))


def test_evaluating_a_noise_decoder_gives_the_same_figures_every_time():
    """The built-in tokenizer's decoder takes noise: its evaluation must not depend on the global random state."""
    from bitdance.data import SyntheticImages
    from bitdance.metrics import evaluate_tokenizer
    from bitdance.models.autoencoder import TOKENIZER_PRESETS, ImageTokenizer

    torch.manual_seed(0)
    tok = ImageTokenizer(TOKENIZER_PRESETS["tiny"]()).with_noise_decoder().eval()
    with torch.no_grad():  # let the noise reach the pixels
        tok.decoder.conv_in.weight[:, tok.config.z_channels:].normal_(0, 0.5)
    data = SyntheticImages(8, tok.config.resolution, tok.config.in_channels, num_classes=2, seed=0)
    torch.manual_seed(1)
    first = evaluate_tokenizer(tok, data)
    torch.manual_seed(2)
    assert evaluate_tokenizer(tok, data)["psnr"] == first["psnr"]
