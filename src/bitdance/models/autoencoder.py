"""ImageTokenizer: the official BitDance convolutional autoencoder with a binary (or VQ) bottleneck.

Architecture and parameter names follow the official `VQModel` (ref §2.2, §6.2) exactly, so official
tokenizer checkpoints (`ae_config.json` + `ae.safetensors`, or `ae_d16c32.pt`) load with strict=True:

    encoder: conv_in -> down.{i}.block.{j} (+ down.{i}.downsample) -> mid_block.{j} -> norm_out -> conv_out
    decoder: conv_in -> mid_block.{j} -> for l = L-1..0: adaptive.{l}, up.{l}.block.{b}, up.{l}.upsample
             -> norm_out -> conv_out

`decoder.up.{l}` / `decoder.adaptive.{l}` are indexed by resolution level (0 = full resolution), like the
encoder, although the decoder runs them from l = L-1 down to 0 (the official code builds them with
`insert(0, ...)`). Letters: b batch, c image channels, k bits per token (= z_channels), h/w token grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from bitdance.models.quantizer import QuantizerConfig, QuantizerOutput, build_quantizer
from bitdance.utils import PretrainedMixin, UserError, check_state_shapes, random_on

# ----------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32  # k: bits per token
    gan_decoder: bool = False  # noise-concat decoder (official d32 tokenizers)
    quantizer: str = "binary"  # "binary" | "vq"
    group_size: int = 8  # bits per entropy / VQ group
    resolution: int = 256  # default image size

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            raise UserError(f"tokenizer widths {widths} (ch x ch_mult) must be multiples of 32 (GroupNorm)")
        if self.quantizer not in ("binary", "vq"):
            raise UserError(f"unknown quantizer {self.quantizer!r}; choose binary or vq")
        self.quantizer_config()  # validates z_channels % group_size

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def bits_per_token(self) -> int:
        return self.z_channels

    def token_grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(h, w) of the token grid for an image size (default `resolution`)."""
        size = self.resolution if image_size is None else image_size
        H, W = (size, size) if isinstance(size, int) else size
        f = self.downsample_factor
        if H % f or W % f:
            raise UserError(f"image size {H}x{W} is not divisible by the tokenizer's downsampling factor {f}")
        return H // f, W // f

    def quantizer_config(self) -> QuantizerConfig:
        cfg = QuantizerConfig(bits=self.z_channels, group_size=self.group_size, kind=self.quantizer)
        cfg.num_groups  # noqa: B018 (raises UserError when z_channels % group_size != 0)
        return cfg


def tiny() -> TokenizerConfig:
    """Unit tests: 16x16 RGB images -> 8x8 tokens of 16 bits."""
    return TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, resolution=16)


def fmnist() -> TokenizerConfig:
    """Fashion-MNIST (padded to 32x32, 1 channel) -> 8x8 tokens of 32 bits in 4 groups of 8.

    0.60 M parameters, 0.55 GFLOP per image per training step: the widest/deepest net that trains at
    ~150 images/s (batch 64, fwd+bwd+Adam, 2 CPU threads; ~80 images/s per core)."""
    return TokenizerConfig(
        in_channels=1, out_channels=1, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32,
        resolution=32,
    )  # fmt: skip


def d16c32() -> TokenizerConfig:
    """Official 16x / 32-bit tokenizer (460.3 M parameters), used by every released AR model."""
    return TokenizerConfig(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=32, resolution=256)


def d32c128() -> TokenizerConfig:
    """Official 32x / 128-bit tokenizer with the noise-concat GAN decoder."""
    return TokenizerConfig(
        ch=128, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=4, z_channels=128, gan_decoder=True, resolution=256
    )


def d32c256() -> TokenizerConfig:
    """Official 32x / 256-bit tokenizer with the noise-concat GAN decoder."""
    return TokenizerConfig(
        ch=128, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=4, z_channels=256, gan_decoder=True, resolution=256
    )


TOKENIZER_PRESETS = {"tiny": tiny, "fmnist": fmnist, "d16c32": d16c32, "d32c128": d32c128, "d32c256": d32c256}

# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _gn(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _gn(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = _gn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


def depth_to_space_dcr(x: torch.Tensor, block: int = 2) -> torch.Tensor:
    """(b, s*s*c, h, w) -> (b, c, h*s, w*s) in DCR order: channel (i*s + j)*c + c' goes to (c', h*s+i, w*s+j).

    DCR ("depth-column-row", the official `depth_to_space`) puts the block offset in the OUTER part of the
    channel index. `F.pixel_shuffle` is the CRD order (channel c'*s*s + i*s + j), which would scramble
    official upsampler weights.
    """
    return rearrange(x, "b (i j c) h w -> b c (h i) (w j)", i=block, j=block)


class Upsampler(nn.Module):
    """conv3x3 C -> 4C, then depth-to-space (DCR) by 2: learned 2x upsampling, no interpolation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space_dcr(self.conv1(x), 2)  # (b, C, 2h, 2w)


class AdaptiveGroupNorm(nn.Module):
    """GN without affine, modulated by the quantized latent's global statistics:
    gamma(std) * gn(x) + beta(mean)."""

    def __init__(self, z_channels: int, channels: int):
        super().__init__()
        self.gn = _gn(channels, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    @staticmethod
    def latent_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel spatial (std, mean) of z (b, k, h, w); std from the UNBIASED variance + 1e-6.

        The official code uses torch.var's default (unbiased, N-1) despite a comment saying otherwise. A 1x1
        grid has no unbiased variance (the official code gives NaN); there we fall back to the biased one.
        """
        flat = z.flatten(2)  # (b, k, h*w)
        correction = 1 if flat.shape[-1] > 1 else 0
        std = (flat.var(dim=-1, correction=correction) + 1e-6).sqrt()  # (b, k)
        return std, flat.mean(dim=-1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        std, mean = self.latent_stats(z)  # (b, k)
        scale = self.gamma(std)[:, :, None, None]  # (b, C, 1, 1)
        shift = self.beta(mean)[:, :, None, None]  # (b, C, 1, 1)
        return scale * self.gn(x) + shift


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, nres = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        c_in = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(nres):
                level.block.append(ResBlock(c_in, ch * m))
                c_in = ch * m
            if i < len(mult) - 1:
                level.downsample = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList([ResBlock(c_in, c_in) for _ in range(nres)])
        self.norm_out = _gn(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (b, ch, H, W)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)  # (b, C, H/2^(i+1), W/2^(i+1))
        for block in self.mid_block:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (b, k, h, w)


class Decoder(nn.Module):
    """Official Decoder; with `gan_decoder`, the GANDecoder (standard-normal noise concatenated to z)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, nres = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.gan = cfg.gan_decoder
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels * (2 if self.gan else 1), c_in, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(c_in, c_in) for _ in range(nres)])
        up, adaptive = [None] * len(mult), [None] * len(mult)
        for lvl in reversed(range(len(mult))):  # built top (coarsest) to bottom, stored by level index
            adaptive[lvl] = AdaptiveGroupNorm(cfg.z_channels, c_in)
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(nres):
                level.block.append(ResBlock(c_in, ch * mult[lvl]))
                c_in = ch * mult[lvl]
            if lvl > 0:
                level.upsample = Upsampler(c_in)
            up[lvl] = level
        self.up = nn.ModuleList(up)
        self.adaptive = nn.ModuleList(adaptive)
        self.norm_out = _gn(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        style = z  # (b, k, h, w): its global statistics modulate every level
        if self.gan:
            noise = random_on("normal", z.shape, generator, z.device, z.dtype)
            z = torch.cat([z, noise], dim=1)  # (b, 2k, h, w): latent first, then noise
        x = self.conv_in(z)  # (b, C_top, h, w)
        for block in self.mid_block:
            x = block(x)
        for lvl in reversed(range(len(self.up))):
            x = self.adaptive[lvl](x, style)
            for block in self.up[lvl].block:
                x = block(x)
            if lvl > 0:
                x = self.up[lvl].upsample(x)  # (b, C, 2h', 2w')
        return self.conv_out(F.silu(self.norm_out(x)))  # (b, c, H, W)


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (b, c, H, W)
    codes: torch.Tensor  # (b, k, h, w), straight-through in training
    quant: QuantizerOutput = field(repr=False)  # indices, aux loss terms, usage


class ImageTokenizer(nn.Module, PretrainedMixin):
    """Images (b, c, H, W) in [-1, 1] <-> codes (b, k, H/f, W/f) of exactly ±1 (binary) or VQ latents."""

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # official name `quantize`; the binary quantizer has no state, the VQ one owns `quantize.codebook`
        self.quantize = build_quantizer(config.quantizer_config())

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def bits_per_token(self) -> int:
        return self.config.bits_per_token

    def token_grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        return self.config.token_grid(image_size)

    def _prepare(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        """Check (b, channels, ., .) and move to the parameters' device and dtype."""
        if x.ndim != 4 or x.shape[1] != channels:
            raise UserError(f"tokenizer expects {what} (b, {channels}, ., .), got {tuple(x.shape)}")
        if what == "images":
            self.token_grid(tuple(x.shape[-2:]))
        w = self.decoder.conv_in.weight
        return x.to(device=w.device, dtype=w.dtype)

    # Inference only (training goes through forward): no graph is built, and a VQ quantizer in train mode
    # does not restart codewords, since that needs grad enabled
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) -> codes (b, k, h, w): exactly ±1 (binary) or the quantized latent (vq); no grad."""
        images = self._prepare(images, self.config.in_channels, "images")
        return self.quantize(self.encoder(images), compute_loss=False).codes

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) -> indices (b, k/g, h, w), little endian per group of g bits."""
        images = self._prepare(images, self.config.in_channels, "images")
        return self.quantize(self.encoder(images), compute_loss=False).indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantize.indices_to_codes(indices)

    def decode(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """codes (b, k, h, w) -> images (b, c, h*f, w*f); the GAN decoder draws its noise from `generator`."""
        return self.decoder(self._prepare(codes, self.config.z_channels, "codes"), generator=generator)

    def decode_indices(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.indices_to_codes(indices), generator=generator)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> TokenizerOutput:
        """Training pass: encode, quantize (straight-through, aux losses in training mode), decode."""
        images = self._prepare(images, self.config.in_channels, "images")
        quant = self.quantize(self.encoder(images))
        # the quantizer returns fp32 codes; a bf16/fp16 model's decoder wants its own dtype (as in decode)
        rec = self.decoder(quant.codes.to(images.dtype), generator=generator)  # (b, c, H, W)
        return TokenizerOutput(reconstruction=rec, codes=quant.codes, quant=quant)

    def with_noise_decoder(self) -> "ImageTokenizer":
        """A copy whose decoder is the noise-concat GAN decoder (`gan_decoder`), computing exactly this one's images
        until it is trained: the new noise inputs of `decoder.conv_in` start with zero weights. The encoder and
        quantizer are this one's, so every code stays the same (a decoder-only fine-tune can then learn to draw
        detail the codes do not fix)."""
        if self.config.gan_decoder:
            raise UserError("this tokenizer's decoder already takes noise (gan_decoder)")
        wider = ImageTokenizer(replace(self.config, gan_decoder=True)).to(self.decoder.conv_in.weight)
        state = self.state_dict()
        k = self.config.z_channels
        weight = torch.zeros_like(wider.decoder.conv_in.weight)  # (C, 2k, 3, 3): latent first, then noise
        weight[:, :k] = state["decoder.conv_in.weight"]
        state["decoder.conv_in.weight"] = weight
        wider.load_state_dict(state, strict=True)
        return wider.train(self.training)

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        config: TokenizerConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> "ImageTokenizer":
        """Load an official tokenizer checkpoint (strict).

        `path`: a folder holding `ae_config.json` + `ae.safetensors` (or `<name>_config.json` +
        `<name>.safetensors`), one of those two files, or a `.pt` dict with a `state_dict` key (e.g.
        `ae_d16c32.pt`; a `vae.` prefix is stripped, keys outside the encoder, decoder and quantizer, such as a
        training checkpoint's loss weights, are set aside with a logged note). Without `config` (and without a
        JSON config) the architecture is inferred from the tensor shapes. A file that does not match raises
        UserError.
        """
        from bitdance.models.autoencoder_official import infer_config, official_key_shapes, read_official_tokenizer

        state, file_config, source = read_official_tokenizer(path)
        config = config or file_config or infer_config(state, source)
        check_state_shapes(official_key_shapes(config), state, source, "the tokenizer config")
        # a binary tokenizer has no buffers: build it on meta and adopt the loaded tensors (no double memory)
        with torch.device("meta" if config.quantizer == "binary" else "cpu"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=config.quantizer == "binary")
        return model.float().to(device).eval()
