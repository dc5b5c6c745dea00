"""BitDance: the class-conditional autoregressive backbone in the official ImageNet layout (ref §3.1, §6.2, §8).

Sequence (training, length L = class_tokens + n - 1):

    [cls_0 .. cls_{C-1}] [q_1 .. q_{P-1}] [proj_in(tok_0) .. proj_in(tok_{n-P-1})]

with tokens in patch-raster order (patch-major, raster inside a sqrt(P) x sqrt(P) patch). The outputs at positions
C-1 .. L-1 condition the head for tokens 0 .. n-1: block 0 = [cls_{C-1}, q_1..q_{P-1}] predicts patch 0, block k
(the P tokens of patch k-1) predicts patch k, slot j -> token j of the next patch. P = 1 is plain next-token
prediction. Attention is causal up to position C-2 and block-causal (blocks of P) from C-1 on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bitdance.utils import PretrainedMixin, UserError, random_on

PARALLEL_CHOICES = (1, 4, 16, 64)
CFG_SCHEDULES = ("linear", "constant")  # guidance over the AR steps: ramp 1 -> s (ImageNet), or constant (T2I)


def check_cfg_schedule(schedule: str) -> str:
    """`schedule` if it names one of CFG_SCHEDULES, else a UserError.

    The one check of the config and the sampler; CLI flags take CFG_SCHEDULES as their choices.
    """
    if schedule not in CFG_SCHEDULES:
        raise UserError(f"unknown cfg schedule {schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
    return schedule


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class BitDanceConfig:
    dim: int = 768
    n_layers: int = 24
    n_heads: int = 12
    ffn_hidden: int | None = None  # None: find_multiple(int(8 dim / 3), 256), the official SwiGLU width
    num_classes: int = 1000  # the null class (CFG, label dropout) is id num_classes
    class_tokens: int = 64  # prefix tokens per class id
    token_bits: int = 32  # k
    grid_size: tuple[int, int] = (16, 16)  # token grid (h, w)
    parallel: int = 1  # P tokens per AR step, one sqrt(P) x sqrt(P) patch
    head: str = "diffusion"  # "diffusion" | "bitwise"
    head_width: int = 768
    head_depth: int = 6
    head_adaln: int = 2
    head_attn_dim: int = 64  # per-head width of the patch-attention head (P > 1)
    head_temperature: float = 1.0  # sampling default: bitwise softmax temperature / diffusion sampler noise scale
    class_dropout: float = 0.1
    perturb_rate: float = 0.1  # input bit flips: flip when u1 < rate * u2
    diff_batch_mul: int = 4
    P_mean: float = -0.8
    P_std: float = 0.8
    time_shift: float = 1.0
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    grad_checkpointing: bool = False
    # sampling defaults saved with the model
    cfg_scale: float = 3.2
    cfg_schedule: str = "linear"  # "linear" | "constant"
    num_sampling_steps: int = 100

    def __post_init__(self):
        self.grid_size = tuple(int(v) for v in self.grid_size)
        h, w = self.grid_size
        sizes = ("dim", "n_layers", "n_heads", "num_classes", "token_bits", "head_width", "head_depth", "head_adaln",
                 "head_attn_dim", "diff_batch_mul")
        small = [f"{name}={getattr(self, name)!r}" for name in sizes
                 if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if small or min(h, w) < 1:
            raise UserError(f"model sizes must all be whole numbers >= 1, got {', '.join(small) or f'grid {h}x{w}'}")
        if self.parallel not in PARALLEL_CHOICES:
            raise UserError(f"parallel must be one of {PARALLEL_CHOICES}, got {self.parallel}")
        side = math.isqrt(self.parallel)
        if h % side or w % side:
            raise UserError(
                f"token grid {h}x{w} is not divisible by the {side}x{side} patch of parallel={self.parallel}"
            )
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise UserError(f"dim {self.dim} / n_heads {self.n_heads} must give a head width divisible by 4 (2D RoPE)")
        if self.head not in ("diffusion", "bitwise"):
            raise UserError(f"head must be 'diffusion' or 'bitwise', got {self.head!r}")
        check_cfg_schedule(self.cfg_schedule)
        if self.class_tokens < 1:
            raise UserError("class_tokens must be >= 1")
        for name in ("class_dropout", "perturb_rate"):  # probabilities (NaN fails the comparison too)
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        # the sampling defaults saved with the model: caught here, not at the first `bitdance sample` after training
        if not (self.cfg_scale >= 1 and math.isfinite(self.cfg_scale)):  # NaN and inf too
            raise UserError(f"cfg_scale must be finite and >= 1 (1 turns guidance off), got {self.cfg_scale}")
        if self.num_sampling_steps < 1:
            raise UserError(f"num_sampling_steps must be >= 1, got {self.num_sampling_steps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_steps(self) -> int:
        """AR steps S = n / P."""
        return self.num_tokens // self.parallel

    @property
    def seq_len(self) -> int:
        """Training sequence length L = C + n - 1 (the last patch is never an input)."""
        return self.class_tokens + self.num_tokens - 1

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else find_multiple(8 * self.dim // 3, 256)


# ----------------------------------------------------------------------------------------------
# Token order, 2D RoPE, masks (pure functions, meta-device safe)
# ----------------------------------------------------------------------------------------------


def patch_order(h: int, w: int, parallel: int, device=None) -> torch.Tensor:
    """perm (n,) such that x_patch = x_raster[:, perm]: patch-major raster, raster inside each patch."""
    s = math.isqrt(parallel)
    idx = torch.arange(h * w, device=device).view(h // s, s, w // s, s)  # (ph, s, pw, s) raster ids
    return idx.permute(0, 2, 1, 3).reshape(-1)


def rope_angles(coords: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """coords (L, 2) as (x, y) -> angles (L, head_dim/2) = [x f_0..x f_{m-1}, y f_0..y f_{m-1}], m = head_dim/4.

    f_i = base^(-2i / (head_dim/2)); angle j rotates the interleaved pair (2j, 2j+1), so the first half of a head
    rotates with x (column) and the second half with y (row).
    """
    m = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(m, device=coords.device, dtype=torch.float32) * 2 / (head_dim // 2))
    coords = coords.float()
    return torch.cat([coords[:, :1] * freqs, coords[:, 1:] * freqs], dim=-1)  # (L, 2m)


def sequence_coords(config: BitDanceConfig, device=None) -> torch.Tensor:
    """(L, 2) RoPE coordinates of each sequence position: prefix (class + query) at (0, 0); input token j (patch
    order) at (c + 1.5, r + 1.5) of its grid cell (patch centre +0.5, then +1 so no image token sits at the origin)."""
    h, w = config.grid_size
    n, p = config.num_tokens, config.parallel
    raster = torch.arange(n, device=device)
    xy = torch.stack([raster % w, raster // w], dim=-1).float() + 1.5  # (n, 2) in raster order
    xy = xy[patch_order(h, w, p, device)]  # (n, 2) patch order
    prefix = torch.zeros(config.class_tokens + p - 1, 2, device=device)
    return torch.cat([prefix, xy[: n - p]], dim=0)  # (L, 2)


def block_causal_mask(seq_len: int, class_tokens: int, parallel: int, device=None) -> torch.Tensor:
    """(L, L) bool, True = may attend. Causal everywhere; additionally, from position class_tokens - 1 on,
    positions in the same block of `parallel` see each other (block 0 = last class token + P-1 queries)."""
    i = torch.arange(seq_len, device=device)
    start = class_tokens - 1
    causal = i[None, :] <= i[:, None]
    block = torch.where(i >= start, (i - start) // parallel, -1 - i)  # prefix rows get unique negative ids
    return causal | (block[:, None] == block[None, :])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, L, heads, hd); cos/sin (L, hd/2). Rotation in fp32, result in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # (b, L, heads, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :].float(), sin[None, :, None, :].float()
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------
# Layers (official names: attention.wqkv/wo, feed_forward.w1/w2, attention_norm, ffn_norm)
# ----------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Fused SwiGLU: w1 -> (a, b), out = w2(silu(a) * b); the first half is the gated one (official chunk order)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(in_dim, 2 * hidden, bias=bias)
        self.w2 = nn.Linear(hidden, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        # KV cache: plain attributes, never part of the state dict
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, cos, sin, mask=None, is_causal=False, cache_start: int | None = None):
        b, L, _ = x.shape
        q, k, v = self.wqkv(x).view(b, L, 3, self.n_heads, self.head_dim).unbind(2)  # each (b, L, heads, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, L, hd)
        if cache_start is not None:
            end = cache_start + L
            self.k_cache[:, :, cache_start:end] = k.to(self.k_cache.dtype)
            self.v_cache[:, :, cache_start:end] = v.to(self.v_cache.dtype)
            k = self.k_cache[:, :, :end].to(q.dtype)  # (b, heads, end, hd)
            v = self.v_cache[:, :, :end].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (b, heads, L, hd)
        return self.wo(out.transpose(1, 2).reshape(b, L, -1))


class TransformerBlock(nn.Module):
    def __init__(self, config: BitDanceConfig):
        super().__init__()
        self.attention = Attention(config.dim, config.n_heads)
        self.feed_forward = SwiGLU(config.dim, config.ffn_width, config.dim, bias=False)
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x, cos, sin, mask=None, is_causal=False, cache_start=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, is_causal, cache_start)
        return x + self.feed_forward(self.ffn_norm(x))


def head_config(config: BitDanceConfig):
    from bitdance.models.diffusion_head import HeadConfig

    return HeadConfig(
        token_bits=config.token_bits,
        cond_dim=config.dim,
        width=config.head_width,
        depth=config.head_depth,
        num_adaln=config.head_adaln,
        parallel=config.parallel,
        attn_head_dim=config.head_attn_dim,
        P_mean=config.P_mean,
        P_std=config.P_std,
        time_shift=config.time_shift,
        diff_batch_mul=config.diff_batch_mul,
        temperature=config.head_temperature,
    )


def build_head(config: BitDanceConfig) -> nn.Module:
    """The head module (`self.head`); it initialises itself (official head init), the backbone init skips it."""
    if config.head == "diffusion":
        from bitdance.models.diffusion_head import DiffusionHead

        return DiffusionHead(head_config(config))
    from bitdance.models.bitwise_head import BitwiseHead

    return BitwiseHead(head_config(config))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class BitDance(nn.Module, PretrainedMixin):
    config_class = BitDanceConfig

    def __init__(self, config: BitDanceConfig):
        super().__init__()
        self.config = c = config
        h, w = c.grid_size
        self.cls_embedding = nn.Embedding(c.num_classes + 1, c.class_tokens * c.dim)
        if c.parallel > 1:
            self.query_token = nn.Parameter(torch.randn(1, c.parallel - 1, c.dim) * 0.02)
        self.proj_in = SwiGLU(c.token_bits, 3 * c.dim // 2, c.dim, bias=True)
        self.emb_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.pos_for_diff = nn.Embedding(h * w, c.dim)  # row j: target token j in PATCH order (official)
        self.head = build_head(c)

        angles = rope_angles(sequence_coords(c), c.head_dim, c.rope_base)  # (L, hd/2) fp32
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.register_buffer("attn_mask", block_causal_mask(c.seq_len, c.class_tokens, c.parallel), persistent=False)
        perm = patch_order(h, w, c.parallel)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)
        self._cache_batch: int | None = None
        self.grad_checkpointing = c.grad_checkpointing
        self._init_weights()

    def _apply(self, fn, recurse=True):
        tables = self.rope_cos, self.rope_sin  # fp32
        super()._apply(fn, recurse)
        # a cast of the whole model (.to(torch.bfloat16), .half()) must not round the RoPE tables to 8 bits of
        # mantissa: they follow the device, not the dtype (the official freqs_cis stays fp32 too)
        if tables[0].device.type != "meta":
            device = self.rope_cos.device
            self.rope_cos, self.rope_sin = tables[0].to(device), tables[1].to(device)
        return self

    @property
    def grad_checkpointing(self) -> bool:
        """Recompute activations in the backward pass (memory for compute): the trunk's layers and the head's."""
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        self._grad_checkpointing = bool(on)
        for m in self.head.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = bool(on)

    def _init_weights(self):
        for name, m in self.named_modules():
            if name == "head" or name.startswith("head."):
                continue  # the head keeps its own (official) initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # -- order helpers ------------------------------------------------------------------------

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def to_patch_order(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, ...) raster -> patch order."""
        return x[:, self.perm]

    def to_raster_order(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, ...) patch order -> raster."""
        return x[:, self.inv_perm]

    def _check_inputs(self, tokens: torch.Tensor, labels: torch.Tensor, allow_null: bool = False) -> None:
        n, k = self.config.num_tokens, self.config.token_bits
        if tokens.dim() != 3 or tokens.shape[1:] != (n, k):
            raise UserError(f"expected tokens of shape (b, {n}, {k}) for this model, got {tuple(tokens.shape)}")
        # an id past the table is an index error (a device-side assert on a GPU); the null class (id num_classes)
        # is for the unguided branch, and training draws it itself (label dropout)
        if labels.device.type != "cpu":  # checking would stall an accelerator every step; the trainer's labels
            return  # are valid by construction
        last = self.config.num_classes - (0 if allow_null else 1)
        bad = labels[(labels < 0) | (labels > last)]
        if bad.numel():
            raise UserError(f"class labels must be in 0..{last}, got {int(bad[0])}")

    # -- training-time corruption -------------------------------------------------------------

    def drop_labels(self, labels: torch.Tensor, generator=None, force_drop: torch.Tensor | None = None):
        """Replace labels by the null class with prob class_dropout (training), or where force_drop is True."""
        if force_drop is not None:
            return torch.where(force_drop.bool(), self.null_class, labels)
        if self.training and self.config.class_dropout > 0:
            drop = random_on("uniform", labels.shape, generator, labels.device) < self.config.class_dropout
            labels = torch.where(drop, self.null_class, labels)
        return labels

    def perturb(self, tokens: torch.Tensor, generator=None) -> torch.Tensor:
        """Flip each input bit where u1 < rate * u2 (i.e. with prob rate/2), official `flip_tensor_elements`."""
        rate = self.config.perturb_rate
        if rate <= 0:
            return tokens
        u1 = random_on("uniform", tokens.shape, generator, tokens.device)
        u2 = random_on("uniform", tokens.shape, generator, tokens.device)
        return torch.where(u1 < rate * u2, -tokens, tokens)

    # -- trunk ------------------------------------------------------------------------------------

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """±1 tokens (b, L, k) -> (b, L, d); the fp32 bits are cast to the weights' dtype (a bf16-cast model)."""
        return self.proj_in(tokens.to(self.proj_in.w1.weight.dtype))

    def _prefix(self, class_ids: torch.Tensor) -> torch.Tensor:
        """(b,) -> (b, C + P - 1, d): class tokens (row-major split of the C*d embedding) + query tokens."""
        b, c = class_ids.shape[0], self.config
        x = self.cls_embedding(class_ids).view(b, c.class_tokens, c.dim)  # (b, C, d)
        if c.parallel > 1:
            x = torch.cat([x, self.query_token.expand(b, -1, -1).to(x.dtype)], dim=1)  # (b, C+P-1, d)
        return x

    def _trunk(self, x: torch.Tensor, start: int, mask=None, is_causal=False, use_cache=False) -> torch.Tensor:
        """Positions start .. start+L-1 through emb_norm, the layers and the final norm. (b, L, d) -> (b, L, d)."""
        L = x.shape[1]
        cos, sin = self.rope_cos[start : start + L], self.rope_sin[start : start + L]
        cache_start = start if use_cache else None
        # residual stream in the parameter dtype (fp32 under autocast) on every path, cached or not
        x = self.emb_norm(x.to(self.emb_norm.weight.dtype))
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                fn = partial(layer, cos=cos, sin=sin, mask=mask, is_causal=is_causal, cache_start=cache_start)
                x = checkpoint(fn, x, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, cache_start)
        return self.norm(x)

    def _teacher_forced(self, inputs: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """inputs (b, n, k) patch order -> head conditions (b, n, d) for every target token, pos_for_diff added."""
        c = self.config
        x = self._embed_tokens(inputs[:, : c.num_tokens - c.parallel])  # (b, n-P, d)
        prefix = self._prefix(class_ids)
        x = torch.cat([prefix, x.to(prefix.dtype)], dim=1)  # (b, L, d); same dtypes as the cached path
        if c.parallel == 1:
            out = self._trunk(x, 0, is_causal=True)  # plain causal: SDPA's fast path
        else:
            out = self._trunk(x, 0, mask=self.attn_mask)
        return out[:, c.class_tokens - 1 :] + self.pos_for_diff.weight  # (b, n, d)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        """Training loss. tokens (b, n, k) in ±1, raster order; labels (b,). Label dropout and input bit flips
        apply in training mode only; the targets stay clean."""
        self._check_inputs(tokens, labels)
        c = self.config
        target = self.to_patch_order(tokens)  # (b, n, k)
        inputs = self.perturb(target, generator) if self.training else target
        labels = self.drop_labels(labels, generator)
        cond = self._teacher_forced(inputs, labels)  # (b, n, d)
        b = tokens.shape[0]
        cond = cond.reshape(b * c.num_steps, c.parallel, c.dim)  # (b*s, p, d)
        target = target.reshape(b * c.num_steps, c.parallel, c.token_bits)  # (b*s, p, k)
        return self.head.loss(cond, target, generator=generator)

    def head_conditions(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced head conditions (b, s, p, d) in patch order, without label dropout or bit flips
        (labels may include the null class, num_classes)."""
        self._check_inputs(tokens, labels, allow_null=True)
        c = self.config
        cond = self._teacher_forced(self.to_patch_order(tokens), labels)  # (b, n, d)
        return cond.view(tokens.shape[0], c.num_steps, c.parallel, c.dim)

    # -- incremental decoding ----------------------------------------------------------------------

    def setup_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Preallocate (batch, heads, L, head_dim) keys and values per layer."""
        ref = self.norm.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        shape = (batch, self.config.n_heads, self.config.seq_len, self.config.head_dim)
        for layer in self.layers:
            layer.attention.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.attention.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self._cache_batch = batch

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.k_cache = layer.attention.v_cache = None
        self._cache_batch = None

    def _step_span(self, step: int) -> tuple[int, int]:
        """Sequence positions [start, end) fed at AR step `step` (step 0: the whole prefix)."""
        c = self.config
        if not 0 <= step < c.num_steps:
            raise ValueError(f"step {step} out of range 0..{c.num_steps - 1}")
        first = c.class_tokens + c.parallel - 1
        if step == 0:
            return 0, first
        start = first + (step - 1) * c.parallel
        return start, start + c.parallel

    def _step_output(self, out: torch.Tensor, step: int) -> torch.Tensor:
        p = self.config.parallel
        return out[:, -p:] + self.pos_for_diff.weight[step * p : (step + 1) * p]  # (b, p, d)

    def prefill(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Run the class (+ query) prefix into the cache; returns the condition for patch 0, (b, p, d)."""
        if self._cache_batch != class_ids.shape[0]:
            raise RuntimeError("call setup_cache(batch) with the prefill batch size first")
        start, end = self._step_span(0)
        out = self._trunk(self._prefix(class_ids), start, self.attn_mask[start:end, :end], use_cache=True)
        return self._step_output(out, 0)

    def decode_step(self, new_tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed patch step-1's tokens (b, p, k) (patch order); returns the condition for patch `step`, (b, p, d)."""
        if step < 1:
            raise ValueError("decode_step starts at step 1; step 0 is prefill")
        start, end = self._step_span(step)
        if self._cache_batch != new_tokens.shape[0]:
            raise RuntimeError("call setup_cache(batch) and prefill with this batch size first")
        x = self._embed_tokens(new_tokens)  # (b, p, d)
        # a whole block attending to every earlier position: the block-causal mask is all True here, and no mask
        # lets SDPA pick its fast kernels (tests/test_transformer.py checks the mask slice)
        out = self._trunk(x, start, None, use_cache=True)
        return self._step_output(out, step)

    def prefix_conditions(self, class_ids: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Cache-free: recompute the whole prefix. prev_tokens (b, step*p, k) in patch order -> cond (b, p, d)."""
        c = self.config
        step = prev_tokens.shape[1] // c.parallel
        _, end = self._step_span(step)
        x = self._prefix(class_ids)
        if step > 0:
            x = torch.cat([x, self._embed_tokens(prev_tokens).to(x.dtype)], dim=1)  # (b, end, d)
        out = self._trunk(x, 0, self.attn_mask[:end, :end])
        return self._step_output(out, step)


# ----------------------------------------------------------------------------------------------
# Presets: name -> function(parallel, head, **overrides) -> BitDanceConfig
# ----------------------------------------------------------------------------------------------


def _make(base: dict, parallel: int, head: str, overrides: dict) -> BitDanceConfig:
    fields = {f.name for f in dataclasses.fields(BitDanceConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown BitDance config field(s): {', '.join(unknown)}")
    return BitDanceConfig(**{**base, "parallel": parallel, "head": head, **overrides})


def tiny(parallel: int = 1, head: str = "diffusion", **overrides) -> BitDanceConfig:
    """Seconds-scale test model: 4x4 grid of 8-bit tokens, 5 classes."""
    base = dict(dim=32, n_layers=2, n_heads=2, num_classes=5, class_tokens=3, token_bits=8, grid_size=(4, 4),
                head_width=32, head_depth=2, head_adaln=1, head_attn_dim=16, diff_batch_mul=2,
                cfg_scale=2.0, num_sampling_steps=4)
    return _make(base, parallel, head, overrides)


def fmnist(parallel: int = 1, head: str = "diffusion", **overrides) -> BitDanceConfig:
    """32x32 Fashion-MNIST -> 8x8 tokens of 32 bits, 10 classes: 7.7 M parameters at 4x; ~20-29 images/s of
    training on a 2-core CPU (3,000 steps at batch 32 in about an hour).

    diff_batch_mul 2 (official 4): at this size the head costs as much as the backbone per repeat."""
    base = dict(dim=256, n_layers=6, n_heads=4, num_classes=10, class_tokens=4, token_bits=32, grid_size=(8, 8),
                head_width=256, head_depth=3, head_adaln=1, head_attn_dim=64, perturb_rate=0.1, diff_batch_mul=2,
                cfg_scale=2.0, num_sampling_steps=25)
    return _make(base, parallel, head, overrides)


def _official(dim, n_layers, n_heads, head_depth, head_adaln, perturb, cfg, parallel, head, overrides):
    # ref §3.1: 64 class tokens, 1001 class rows, 16x16 grid of 32 bits, head width = dim, 100 head steps
    base = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, num_classes=1000, class_tokens=64, token_bits=32,
                grid_size=(16, 16), head_width=dim, head_depth=head_depth, head_adaln=head_adaln,
                perturb_rate=perturb, class_dropout=0.1, diff_batch_mul=4, cfg_scale=cfg,
                cfg_schedule="linear", num_sampling_steps=100)
    return _make(base, parallel, head, overrides)


def bitdance_b(parallel: int = 1, head: str = "diffusion", **overrides) -> BitDanceConfig:
    cfg = {1: 3.2, 4: 3.9, 16: 6.1}.get(parallel, 6.1)  # README sampling commands; 64x unreleased
    return _official(768, 24, 12, 6, 2, 0.1, cfg, parallel, head, overrides)


def bitdance_l(parallel: int = 1, head: str = "diffusion", **overrides) -> BitDanceConfig:
    return _official(1024, 32, 16, 8, 2, 0.05, 4.0, parallel, head, overrides)  # only L-1x is released


def bitdance_h(parallel: int = 1, head: str = "diffusion", **overrides) -> BitDanceConfig:
    return _official(1280, 40, 20, 12, 3, 0.05, 4.55, parallel, head, overrides)  # only H-1x is released


BITDANCE_PRESETS = {"tiny": tiny, "fmnist": fmnist, "B": bitdance_b, "L": bitdance_l, "H": bitdance_h}
