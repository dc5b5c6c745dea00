"""Binary diffusion head: predicts a token's bits from the backbone's condition with a rectified flow.

Official module tree under `head.net` (ref §4.1, §6.2), so official state dicts load with strict=True:

- `MlpEncoder` (parallel == 1, ImageNet 1x): a per-token residual SwiGLU MLP with DiT-style adaLN.
- `TransEncoder` (parallel > 1, ImageNet 4x/16x and T2I): the same, plus bidirectional self-attention over
  the p tokens of one patch (no positional encoding inside the head).

Orders checked against the official source (`imagenet_gen/src/diff_head*.py`,
`modeling/vision_head/flow_head_parallel_x.py`): adaLN chunks are (scale, shift, gate) per sub-block,
final layer (scale, shift) with no SiLU on its input beyond y = SiLU(t_emb + c_emb); SwiGLU gates the
first half of w1 (silu(a) * b); the adaLN linear k serves blocks [k f, (k + 1) f) with f = depth // num_adaln.

Precision follows the official head: the network runs under the caller's autocast (bf16 on a GPU with
--dtype bfloat16; fp32 by default), the flow's noise, loss and sampler updates in fp32 (flow.py).

Letters: b batch, p tokens per patch, k bits per token, d condition width, D head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bitdance.flow import FlowConfig, RectifiedFlow, check_temperature
from bitdance.utils import UserError


@dataclass
class HeadConfig:
    token_bits: int = 32  # k (official ch_target)
    cond_dim: int = 768  # width of the backbone's condition (official ch_cond)
    width: int = 768  # head width D (official ch_latent / model_dim)
    depth: int = 6  # residual blocks
    num_adaln: int = 2  # adaLN linears, each shared by depth/num_adaln consecutive blocks
    parallel: int = 1  # p: 1 -> per-token MLP head (MlpEncoder), >1 -> patch-attention head (TransEncoder)
    attn_head_dim: int = 64  # TransEncoder heads = width / attn_head_dim (ImageNet 64, T2I 128)
    P_mean: float = -0.8  # logit-normal time sampling
    P_std: float = 0.8
    time_shift: float = 1.0
    # repeats of each (cond, target) pair in the loss (ImageNet's meaning; the official T2I head uses the name for
    # memory chunks of one pass, with no repeats, and its released value 1 means the same in both)
    diff_batch_mul: int = 4
    bounded_output: bool = False  # T2I head: x_hat = 2 sigmoid(out) - 1
    temperature: float = 1.0  # sampling default: bitwise softmax temperature / diffusion sampler noise scale


# name -> config. Parameter counts (net only): B 1x 22,106,144; B 4x/16x 39,833,120; L 48.6 M; H 110.3 M;
# T2I 1.758 B (ref §3.1, §4.1).
HEAD_PRESETS = {
    "tiny": lambda: HeadConfig(token_bits=16, cond_dim=64, width=64, depth=2, num_adaln=1, attn_head_dim=16),
    "imagenet-b-1x": lambda: HeadConfig(cond_dim=768, width=768, depth=6, num_adaln=2),
    "imagenet-b-4x": lambda: HeadConfig(cond_dim=768, width=768, depth=6, num_adaln=2, parallel=4),
    "imagenet-b-16x": lambda: HeadConfig(cond_dim=768, width=768, depth=6, num_adaln=2, parallel=16),
    "imagenet-l-1x": lambda: HeadConfig(cond_dim=1024, width=1024, depth=8, num_adaln=2),
    "imagenet-h-1x": lambda: HeadConfig(cond_dim=1280, width=1280, depth=12, num_adaln=3),
    "t2i-14b-16x": lambda: HeadConfig(
        cond_dim=5120, width=5120, depth=6, num_adaln=2, parallel=16, attn_head_dim=128,
        diff_batch_mul=1, bounded_output=True,
    ),
    "t2i-14b-64x": lambda: replace(HEAD_PRESETS["t2i-14b-16x"](), parallel=64),
}


def validate_head_config(c: HeadConfig, flow: bool = True) -> None:
    """Raise UserError on a config the networks cannot be built from. flow False (the bitwise head, one linear
    layer): only the fields that head uses are checked."""
    if min(c.token_bits, c.cond_dim, c.parallel, c.diff_batch_mul) < 1:
        raise UserError(f"head config sizes must all be >= 1: {c}")
    check_temperature(c.temperature)  # the saved sampling default
    if not flow:
        return
    if min(c.width, c.depth, c.num_adaln, c.attn_head_dim) < 1:
        raise UserError(f"head config sizes must all be >= 1: {c}")
    if c.depth % c.num_adaln:
        raise UserError(f"head depth {c.depth} must be divisible by num_adaln {c.num_adaln}")
    if c.parallel > 1 and c.width % c.attn_head_dim != 0:
        raise UserError(f"head width {c.width} must be divisible by attn_head_dim {c.attn_head_dim}")


# ----------------------------------------------------------------------------------------------
# Building blocks (official names)
# ----------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(n,) t in [0, 1] -> (n, dim): [cos | sin] of 1000 t times geometric frequencies (ref §4.1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]  # (n, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (n, 2 half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)  # (n, 256)
        return self.mlp(emb)  # (n, D)


class ResBlock(nn.Module):
    """x + gate * SwiGLU(LN(x) (1 + scale) + shift); SwiGLU(h) = w2(silu(a) * b), [a | b] = w1(h)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=True)
        hidden = int(width * 1.5)
        self.w1 = nn.Linear(width, 2 * hidden)
        self.w2 = nn.Linear(hidden, width)

    def forward(self, x, scale, shift, gate):
        h = self.norm(x) * (1 + scale) + shift
        a, b = self.w1(h).chunk(2, dim=-1)
        return x + gate * self.w2(F.silu(a) * b)


class PatchAttention(nn.Module):
    """Bidirectional multi-head attention over the p tokens of a patch; fused qkv with bias, no RoPE."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.n_head = width // head_dim
        self.head_dim = head_dim
        self.wqkv = nn.Linear(width, 3 * width)
        self.wo = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, d = x.shape
        q, k, v = self.wqkv(x).chunk(3, dim=-1)  # (b, p, D) each, in q, k, v order
        q, k, v = (u.view(b, p, self.n_head, self.head_dim).transpose(1, 2) for u in (q, k, v))
        # q, k, v: (b, h, p, hd)
        # SDPA's default scale 1/sqrt(hd) is what the official softmax(q k^T / sqrt(hd)) uses.
        o = F.scaled_dot_product_attention(q, k, v)  # (b, h, p, hd)
        return self.wo(o.transpose(1, 2).reshape(b, p, d))  # (b, p, D)


class TransBlock(nn.Module):
    """adaLN attention + adaLN SwiGLU; modulation (scale1, shift1, gate1, scale2, shift2, gate2)."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=True)
        self.attn = PatchAttention(width, head_dim)
        self.norm2 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=True)
        hidden = int(width * 1.5)
        self.w1 = nn.Linear(width, 2 * hidden)
        self.w2 = nn.Linear(hidden, width)

    def forward(self, x, scale1, shift1, gate1, scale2, shift2, gate2):
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        h = self.norm2(x) * (1 + scale2) + shift2
        a, b = self.w1(h).chunk(2, dim=-1)
        return x + gate2 * self.w2(F.silu(a) * b)


class FinalLayer(nn.Module):
    """Non-affine LN modulated by (scale, shift) = ada_ln_modulation(y), then linear to k bits."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out)

    def forward(self, x, y):
        scale, shift = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class _Encoder(nn.Module):
    """Shared parts of both encoders: embeddings, adaLN groups, final layer, init, block loop."""

    n_mod = 3  # modulation vectors per block

    def __init__(self, c: HeadConfig, blocks: list[nn.Module]):
        super().__init__()
        D = c.width
        self.input_proj = nn.Linear(c.token_bits, D)
        self.time_embed = TimestepEmbedder(D)
        self.cond_embed = nn.Linear(c.cond_dim, D)
        self.res_blocks = nn.ModuleList(blocks)
        # One adaLN linear serves `switch` consecutive blocks (saves compute and parameters, as upstream).
        self.ada_ln_blocks = nn.ModuleList(nn.Linear(D, self.n_mod * D) for _ in range(c.num_adaln))
        self.switch = max(1, c.depth // c.num_adaln)
        self.final_layer = FinalLayer(D, c.token_bits)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, zero biases, N(0, 0.02) time MLP, zero adaLN and output: a fresh net outputs 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for m in [*self.ada_ln_blocks, self.final_layer.ada_ln_modulation, self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mods = None
        for i, block in enumerate(self.res_blocks):
            if i % self.switch == 0:
                mods = self.ada_ln_blocks[i // self.switch](y).chunk(self.n_mod, dim=-1)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, *mods, use_reentrant=False)
            else:
                x = block(x, *mods)
        return self.final_layer(x, y)


class MlpEncoder(_Encoder):
    """Per-token head (1x). forward(x (n, k), t (n,), c (n, d)) -> x_hat (n, k)."""

    n_mod = 3

    def __init__(self, c: HeadConfig):
        super().__init__(c, [ResBlock(c.width) for _ in range(c.depth)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(x, self.time_embed(t), self.cond_embed(c))

    def forward_embedded(self, x: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        """forward() with t_emb (n or 1, D) and c_emb (n, D) precomputed (the sampler reuses them)."""
        y = F.silu(t_emb + c_emb)  # (n, D)
        return self._run(self.input_proj(x), y)  # (n, k)


class TransEncoder(_Encoder):
    """Patch head (p > 1). forward(x (b, p, k), t (b,), c (b, p, d)) -> x_hat (b, p, k)."""

    n_mod = 6

    def __init__(self, c: HeadConfig):
        super().__init__(c, [TransBlock(c.width, c.attn_head_dim) for _ in range(c.depth)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(x, self.time_embed(t), self.cond_embed(c))

    def forward_embedded(self, x: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        """forward() with t_emb (b or 1, D) and c_emb (b, p, D) precomputed (the sampler reuses them)."""
        # One t per patch, a condition per token: y differs across the patch through c.
        y = F.silu(t_emb[:, None] + c_emb)  # (b, p, D)
        return self._run(self.input_proj(x), y)  # (b, p, k)


# ----------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------


def check_head_inputs(config: HeadConfig, cond: torch.Tensor, target: torch.Tensor | None = None) -> None:
    """Shapes both heads accept: cond (b, p, cond_dim), p = config.parallel for patch heads; target (b, p, k)."""
    if cond.ndim != 3 or cond.shape[-1] != config.cond_dim:
        raise ValueError(f"cond must be (b, p, {config.cond_dim}), got {tuple(cond.shape)}")
    if config.parallel > 1 and cond.shape[1] != config.parallel:
        raise ValueError(f"this head takes patches of {config.parallel} tokens, got {cond.shape[1]}")
    if target is not None and target.shape != (*cond.shape[:2], config.token_bits):
        raise ValueError(f"target must be {(*cond.shape[:2], config.token_bits)}, got {tuple(target.shape)}")


def check_sample_inputs(config: HeadConfig, cond: torch.Tensor, cfg_scale: float | None, guide) -> int:
    """The guidance inputs both heads' `sample` accept; returns b, the number of samples. cfg_scale None: cond is
    (b, p, d); float: [cond; uncond] (2b rows), or with guide = (guide_head, guide_cond) cond and guide_cond are
    each (b, p, d) of their own head."""
    check_head_inputs(config, cond)
    m = cond.shape[0]
    if guide is not None:
        if cfg_scale is None:
            raise ValueError("a guide head needs a cfg_scale")
        guide_head, guide_cond = guide
        check_head_inputs(guide_head.config, guide_cond)
        return m
    if cfg_scale is not None and m % 2:
        raise ValueError(f"with cfg_scale the condition must stack [cond; uncond] (even rows), got {m}")
    return m if cfg_scale is None else m // 2


class DiffusionHead(nn.Module):
    """Binary diffusion head (`self.net` + a weight-free `RectifiedFlow`).

    loss(cond (b, p, d), target (b, p, k)) -> scalar; sample(cond (m, p, d), ...) -> (b, p, k) in {-1, +1}.
    """

    def __init__(self, config: HeadConfig):
        super().__init__()
        validate_head_config(config)
        self.config = config
        self.net = MlpEncoder(config) if config.parallel == 1 else TransEncoder(config)
        flow_cfg = FlowConfig(P_mean=config.P_mean, P_std=config.P_std, time_shift=config.time_shift)
        self.flow = RectifiedFlow(flow_cfg)

    def initialize_weights(self) -> None:
        self.net.initialize_weights()

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (n, p, d) -> the net's condition embedding, in its row layout ((n p, D) for 1x, else (n, p, D))."""
        c_emb = self.net.cond_embed(cond.to(self.net.input_proj.weight.dtype))  # (n, p, D)
        return c_emb.flatten(0, 1) if isinstance(self.net, MlpEncoder) else c_emb

    def forward_net(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                    c_emb: torch.Tensor | None = None, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat (n, p, k) for z (n, p, k), t (n,), cond (n, p, d); fp32 in and out (the net itself runs in the
        caller's autocast dtype).

        The 1x net sees every token as its own row (t repeated over p), the patch net whole patches.
        c_emb (from `embed_cond`) and t_emb (broadcastable over rows) may be passed precomputed.
        """
        n, p, k = z.shape
        z_ = z.to(self.net.input_proj.weight.dtype)
        c_emb = self.embed_cond(cond) if c_emb is None else c_emb
        if isinstance(self.net, MlpEncoder):
            t_emb = self.net.time_embed(t.repeat_interleave(p)) if t_emb is None else t_emb
            out = self.net.forward_embedded(z_.reshape(n * p, k), t_emb, c_emb).view(n, p, k)
        else:
            t_emb = self.net.time_embed(t) if t_emb is None else t_emb
            out = self.net.forward_embedded(z_, t_emb, c_emb)  # (n, p, k)
        out = out.float()
        if self.config.bounded_output:
            out = 2 * torch.sigmoid(out) - 1  # T2I: x_hat in (-1, 1)
        return out

    def loss(
        self,
        cond: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Velocity MSE; each (cond, target) pair repeated diff_batch_mul times with its own t and noise.

        The 1x head draws one t per token, the patch head one t per patch (ref §4.2). reduction "none"
        returns the per-token loss (b, p), averaged over bits and repeats (the T2I trainer's reduction).
        """
        check_head_inputs(self.config, cond, target)
        b, p, _ = cond.shape
        m = self.config.diff_batch_mul
        cond_r = cond.float().repeat(m, 1, 1)  # (m b, p, d), tiled like the official .repeat
        x = target.float().repeat(m, 1, 1)  # (m b, p, k)
        if self.config.parallel == 1:
            # per-token t: every token becomes a row of its own
            cond_r, x = cond_r.reshape(m * b * p, 1, -1), x.reshape(m * b * p, 1, -1)
        fn = lambda z, t: self.forward_net(z, t, cond_r)  # noqa: E731
        out = self.flow.loss(fn, x, generator, reduction=reduction)
        if reduction == "none":
            out = out.reshape(m, b, p).mean(0)  # (b, p)
        return out

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        num_steps: int = 100,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        binarize: bool = True,
        *,
        temperature: float | None = None,
        guide: tuple[DiffusionHead, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(b, p, k) bits in {-1, +1}. cfg_scale None: cond is (b, p, d); float: [cond; uncond] (2b rows).

        temperature scales the sampler's per-step noise (None: the config's; 1: the official sampler).
        guide = (guide_head, guide_cond (b, p, d')), with a float cfg_scale: autoguidance (Karras et al. 2024):
        cond is (b, p, d) and the guiding branch is another (weaker) head on its own condition instead of this
        head on the null class, v = v_guide + cfg_scale (v - v_guide).
        """
        b, p = check_sample_inputs(self.config, cond, cfg_scale, guide), cond.shape[1]
        # The condition is fixed for the whole flow and t is shared by all rows at each flow step: embed
        # the condition once per call and t once per step, not per row and step.
        c_emb = self.embed_cond(cond.float())
        fn = lambda z, t: self.forward_net(z, t, None, c_emb, self.net.time_embed(t[:1]))  # noqa: E731
        if guide is not None:
            guide_head, guide_cond = guide
            g_emb = guide_head.embed_cond(guide_cond.float())
            own = fn

            def fn(z, t):  # z (2b, p, k) = [x; x]: this head's rows first, the guide's second, as [cond; uncond]
                g = guide_head.forward_net(z[b:], t[b:], None, g_emb, guide_head.net.time_embed(t[:1]))
                return torch.cat([own(z[:b], t[:b]), g])
        return self.flow.sample(
            fn, shape=(b, p, self.config.token_bits), num_steps=num_steps, cfg_scale=cfg_scale,
            generator=generator, device=cond.device, binarize=binarize,
            temperature=self.config.temperature if temperature is None else temperature,
        )
