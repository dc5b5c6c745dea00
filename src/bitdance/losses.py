"""Tokenizer training losses: PatchGAN discriminator, hinge + LeCAM, generator losses, LPIPS (local weights).

These follow the WeTok recipe the reference traces the BitDance tokenizer to (ref §2.3, lineage): a 3-layer
PatchGAN with ndf 64, hinge discriminator loss, LeCAM regularisation (weight 0.05, EMA 0.999), a
non-saturating generator loss and an optional VGG16 LPIPS perceptual loss. Nothing here downloads weights:
LPIPS needs a local file and is off by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bitdance.utils import UserError, check_state_shapes, load_checkpoint, read_safetensors, strip_wrapper_prefixes

# ----------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ----------------------------------------------------------------------------------------------


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    ndf: int = 64  # width of the first layer, doubled per layer up to 8x
    n_layers: int = 3  # stride-2 layers after the first conv (PatchGAN "3 layers")
    # "group" | "batch". The trainer uses group only: it runs real and fake in one pass (a BatchNorm would
    # mix their statistics) and the generator's pass sees fakes alone (it would move the running statistics)
    norm: str = "group"


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4), channels)
    raise UserError(f"discriminator norm must be 'group' or 'batch', got {kind!r}")


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix NLayerDiscriminator layout): 4x4 convs, LeakyReLU 0.2, one logit per patch.

    GroupNorm is the default: it does not depend on the per-rank batch size, keeps no running statistics
    (nothing to synchronise under DDP) and lets real and fake images share one forward pass.
    """

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, c.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < c.n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(c.ndf * prev, c.ndf * mult, 4, stride, 1, bias=False), _norm(c.norm, c.ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(c.ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # pix2pix initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (b, 1, h', w') patch logits


# ----------------------------------------------------------------------------------------------
# Adversarial losses
# ----------------------------------------------------------------------------------------------


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """Generator side of the GAN: non-saturating -log sigmoid(D(G)) (WeTok) or hinge -D(G)."""
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    raise UserError(f"generator loss must be 'non_saturating' or 'hinge', got {kind!r}")


class LeCam(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021): keeps real logits below the EMA of fake logits and fake logits
    above the EMA of real ones. The EMAs are buffers, so they travel with the discriminator checkpoint."""

    def __init__(self, decay: float = 0.999, distributed: bool = False):
        super().__init__()
        self.decay = decay
        self.distributed = distributed  # under DDP: every rank follows the global batch's means (one all-reduce)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        means = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        if self.distributed:  # the global batch's means, so every rank keeps (and rank 0 saves) the same EMAs
            dist.all_reduce(means)
            means /= dist.get_world_size()
        r, f = means[0], means[1]
        if not bool(self.initialised):  # start the EMAs at the first batch instead of at 0
            self.ema_real.copy_(r)
            self.ema_fake.copy_(f)
            self.initialised.fill_(True)
        else:
            self.ema_real.lerp_(r, 1.0 - self.decay)
            self.ema_fake.lerp_(f, 1.0 - self.decay)

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        self.update(real_logits, fake_logits)
        return (F.relu(real_logits - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - fake_logits).pow(2).mean())


# ----------------------------------------------------------------------------------------------
# LPIPS (VGG16), local weights only
# ----------------------------------------------------------------------------------------------

# torchvision's vgg16().features layout: conv widths, "M" = max-pool. Feature taps after relu1_2, relu2_2,
# relu3_3, relu4_3, relu5_3 (Sequential indices 3, 8, 15, 22, 29).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS input scaling (images in [-1, 1] -> ImageNet-normalised-like inputs)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


@dataclass
class LPIPSConfig:
    weights: str | None = None  # local file; None builds random weights (tests only)


class LPIPS(nn.Module):
    """LPIPS-VGG16 perceptual distance. It never downloads: `config.weights` must be a local file.

    Expected file (torch .pt/.pth with plain tensors, or .safetensors), one state dict holding:
      - `features.<i>.weight` / `features.<i>.bias`: torchvision `vgg16().features` numbering (i = 0, 2, 5, ...,
        28), e.g. `{k: v for k, v in vgg16(weights=...).features.state_dict().items()}` prefixed with `features.`;
      - `lins.<j>.weight` (1, C_j, 1, 1), j = 0..4: the LPIPS linear heads.
    The `lpips` package's names load too: `lpips.LPIPS(net="vgg").state_dict()` (`net.slice<s>.<i>.*`, which keep
    torchvision's indices, `lin<j>.model.1.weight`; its `scaling_layer` is our constant input scaling), or
    `vgg.features.<i>.*`. The package's own `vgg.pth` holds only the heads: add the VGG16 weights to it.
    """

    def __init__(self, config: LPIPSConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers[: LPIPS_TAPS[-1] + 1])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        if config.weights is not None:
            state = load_lpips_state(config.weights)
            if not any(k.startswith("features.") for k in state):
                raise UserError(f"{config.weights} holds no VGG16 weights (only the LPIPS heads, as lpips' vgg.pth "
                                "does?): add torchvision's vgg16 features.* tensors to the file")
            check_state_shapes(self, state, str(config.weights), "LPIPS-VGG16")
            self.load_state_dict(state, strict=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (b,) between images in [-1, 1] (grey images are repeated to 3 channels)."""
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        x, y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        distance = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-normalise across channels
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            distance = distance + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # (b,)
        return distance


def load_lpips_state(path: str | os.PathLike) -> dict:
    """Read a local LPIPS weights file and rename official LPIPS keys to ours. Never downloads."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LPIPS weights not found: {path} (a local file is required; nothing is downloaded)")
    state = read_safetensors(path) if path.suffix == ".safetensors" else load_checkpoint(path)
    out = {}
    for k, v in strip_wrapper_prefixes(state).items():  # a DDP-saved file's module.
        k = k.removeprefix("net.").removeprefix("vgg.")  # lpips.LPIPS's and its VGG's own prefixes
        if k.startswith("scaling_layer."):  # lpips.LPIPS's input scaling: our constant buffers, same values
            continue
        if k.startswith("lin") and ".model." in k:  # official: lin3.model.1.weight -> lins.3.weight
            k = f"lins.{k[3]}.weight"
        elif k.startswith("slice"):  # lpips.LPIPS's VGG slices keep torchvision's indices: slice2.5.* -> features.5.*
            k = "features." + k.split(".", 1)[1]
        out[k] = v
    return out
