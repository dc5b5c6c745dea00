"""Tokenizer metrics: PSNR, SSIM, bit usage and per-group code perplexity.

Images come in [-1, 1] and are mapped to [0, 1] (clamped) before PSNR/SSIM, so a data range of 1.0 applies.
Both metrics are computed per image and then averaged. Codes are +-1 bits (b, k, h, w), for binary and VQ
tokenizers alike (a VQ tokenizer's indices are written as bits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bitdance.models.quantizer import bits_to_indices, indices_to_bits

PSNR_CAP_DB = 100.0  # identical images give this instead of inf, so means and JSON stay finite


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """Per-image PSNR in dB (b,) of images in [-1, 1], on the [0, 1] scale; capped at `cap_db`."""
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1)  # (b,)
    floor = 10.0 ** (-cap_db / 10.0)
    return -10.0 * torch.log10(mse.clamp_min(floor))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return (g / g.sum()).float()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (b,) of images in [-1, 1] (Wang et al. 2004: Gaussian window, 'valid' filtering,
    per channel, then the mean over channels and positions). The window shrinks for images under 11 px."""
    a, b = _unit(x), _unit(y)  # (b, c, H, W)
    n, c, h, w = a.shape
    size = min(window_size, h, w)
    size -= 1 - size % 2  # keep it odd
    g = _gaussian_window(size, sigma).to(a.device)
    kh = g.view(1, 1, size, 1).expand(c, 1, size, 1)  # separable: columns then rows, one filter per channel
    kw = g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)  # (b, c, H-s+1, W-s+1)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = k1**2, k2**2  # data range 1
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)  # (b,)


# ----------------------------------------------------------------------------------------------
# Codes
# ----------------------------------------------------------------------------------------------


def perplexity(indices: torch.Tensor) -> float:
    """exp(entropy) of the empirical distribution of a 1-D tensor of code indices."""
    _, counts = torch.unique(indices, return_counts=True)
    p = counts.double() / counts.sum()
    return math.exp(float(-(p * p.log()).sum()))


class CodeStats:
    """Accumulates bit usage and per-group code perplexity over batches.

    Feed either +-1 codes (b, k, h, w) (`update`) or group indices (b, G, h, w) (`update_indices`, which is
    what a VQ tokenizer produces; its bits are the little-endian bits of each index).
    """

    def __init__(self, group_size: int):
        self.group_size = group_size
        self.ones, self.total = None, 0
        self.indices: list[torch.Tensor] = []

    def update(self, codes: torch.Tensor) -> None:
        self.update_indices(bits_to_indices(codes.detach().cpu(), self.group_size))  # (b, G, h, w)

    def update_indices(self, indices: torch.Tensor) -> None:
        idx = indices.detach().cpu().long().movedim(1, -1).reshape(-1, indices.shape[1])  # (n, G)
        ones = (indices_to_bits(idx, self.group_size) > 0).sum(0)  # (n, k) +-1 -> (k,) count of +1 per bit
        self.ones = ones if self.ones is None else self.ones + ones
        self.total += idx.shape[0]
        self.indices.append(idx)

    def compute(self) -> dict:
        if self.ones is None:
            return {}
        per_bit = self.ones.double() / self.total  # (k,)
        idx = torch.cat(self.indices)  # (n, G)
        return {
            "bit_usage": float(per_bit.mean()),
            "bit_usage_per_bit": [round(v, 5) for v in per_bit.tolist()],
            "bits_per_group": self.group_size,
            "perplexity_per_group": [round(perplexity(idx[:, j]), 3) for j in range(idx.shape[1])],
            "codebook_size_per_group": 2**self.group_size,
        }


class ReconstructionMeter:
    """Running PSNR/SSIM means plus code statistics, for evaluation loops."""

    def __init__(self, group_size: int = 8):
        self.psnr_sum = self.ssim_sum = 0.0
        self.count = 0
        self.codes = CodeStats(group_size)

    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, indices: torch.Tensor | None = None):
        self.psnr_sum += float(psnr(reconstructions, images).sum())
        self.ssim_sum += float(ssim(reconstructions, images).sum())
        self.count += images.shape[0]
        if indices is not None:
            self.codes.update_indices(indices)

    def compute(self) -> dict:
        n = max(self.count, 1)
        return {"psnr": self.psnr_sum / n, "ssim": self.ssim_sum / n, "num_images": self.count,
                **self.codes.compute()}


@torch.no_grad()
def evaluate_tokenizer(tokenizer, dataset, num_images: int | None = None, batch_size: int = 64,
                       device=None, progress: bool = False, reconstructions: list | None = None) -> dict:
    """PSNR / SSIM / bit usage / per-group perplexity of `tokenizer` on evenly spaced images of `dataset`.

    Pass a list as `reconstructions` to also collect (uint8 (b, H, W, c) reconstructions, labels (b,)) per
    batch, e.g. for the reconstruction FID."""
    from tqdm import tqdm

    from bitdance.data import eval_indices
    from bitdance.utils import to_uint8

    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    was_training = tokenizer.training
    tokenizer.eval()
    meter = ReconstructionMeter(group_size=tokenizer.config.group_size)
    chunks = eval_indices(len(dataset), num_images).split(batch_size)
    noise = torch.Generator(device=device).manual_seed(0)  # a noise-concat decoder scores the same every time
    for idx in tqdm(chunks, desc="evaluating", unit="batch", disable=not progress):
        images, labels = dataset.get_batch(idx)
        out = tokenizer(images.to(device), generator=noise)
        meter.update(images.to(device), out.reconstruction.float(), out.quant.indices)
        if reconstructions is not None:
            reconstructions.append((to_uint8(out.reconstruction.float().cpu()).numpy(), labels))
    tokenizer.train(was_training)
    result = meter.compute()
    result["quantizer"] = tokenizer.config.quantizer
    result["bits_per_token"] = tokenizer.config.z_channels
    return result
