"""The vision components of the official text-to-image release, loaded into our modules (ref §3.2, §6.2).

A BitDance-14B folder (`BitDance-14B-16x`, `-64x`) holds a stock Qwen3 checkpoint (the LLM: a transformers model,
not ours) and three vision parts, each loaded here strictly from safetensors:

- `ae_config.json` + `ae.safetensors`: the binary tokenizer (`ImageTokenizer.from_official`);
- `vision_head_config.json` + `vision_head.safetensors`: the binary diffusion head (`net.*` keys, our
  `DiffusionHead` with the T2I settings: 128-wide attention heads, output 2 sigmoid - 1);
- `projector.safetensors`: the MLP that embeds a 32-bit token into the LLM width (`Projector`, keys `fc1.*`,
  `fc2.*`).

`sincos_positions` builds the fixed 2D sin-cos table the T2I pipeline adds to projected tokens and to the head's
conditions (the T2I models have no learned `pos_for_diff`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitdance.models.autoencoder import ImageTokenizer
from bitdance.models.diffusion_head import DiffusionHead, HeadConfig
from bitdance.models.transformer import PARALLEL_CHOICES, patch_order
from bitdance.official import setting
from bitdance.utils import UserError, check_state_shapes, read_json, read_safetensors

HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME = "vision_head_config.json", "vision_head.safetensors"
PROJECTOR_WEIGHTS_NAME = "projector.safetensors"

# vision_head_config.json key -> HeadConfig field (the official DiffHead keyword arguments)
HEAD_CONFIG_KEYS = {"ch_target": "token_bits", "ch_cond": "cond_dim", "ch_latent": "width",
                    "depth_latent": "depth", "depth_adanln": "num_adaln", "parallel_num": "parallel"}
# the other DiffHead kwargs: checked (use_swiglu, time_schedule), kept for training, or ignored (grad_checkpointing)
OTHER_KEYS = {"P_mean", "P_std", "time_shift", "diff_batch_mul", "time_schedule", "grad_checkpointing",
                      "use_swiglu"}


@dataclass
class ProjectorConfig:
    token_bits: int = 32  # k: bits per token
    dim: int = 5120  # the LLM's hidden width (Qwen3-14B)


class Projector(nn.Module):
    """The official `MLPconnector`: Linear(k -> D), GELU (tanh approximation), Linear(D -> D)."""

    def __init__(self, config: ProjectorConfig | None = None):
        super().__init__()
        self.config = config or ProjectorConfig()
        self.fc1 = nn.Linear(self.config.token_bits, self.config.dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(self.config.dim, self.config.dim)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        """bits (..., k) in ±1 (any float dtype) -> (..., D) input embeddings for the LLM, in the weights' dtype."""
        return self.fc2(self.act(self.fc1(bits.to(self.fc1.weight.dtype))))  # ±1 is exact in bf16


@dataclass
class T2IVisionComponents:
    tokenizer: ImageTokenizer
    head: DiffusionHead
    projector: Projector

    @property
    def parallel(self) -> int:
        return self.head.config.parallel


def head_config_from_official(kwargs: dict, source: str) -> HeadConfig:
    """vision_head_config.json (the official DiffHead kwargs) -> our HeadConfig with the T2I head's settings."""
    missing = [k for k in HEAD_CONFIG_KEYS if k not in kwargs]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: not a BitDance vision_head_config.json")
    if not kwargs.get("use_swiglu", False):  # the official DiffHead's default is the plain MLP
        said = "use_swiglu=false" if "use_swiglu" in kwargs else "no use_swiglu (the official default is false)"
        raise UserError(f"{source}: {said}: a Linear-SiLU-Linear MLP head is not supported; every released "
                        "T2I head uses SwiGLU")
    if kwargs.get("time_schedule", "logit_normal") != "logit_normal":
        raise UserError(f"{source}: time_schedule={kwargs['time_schedule']!r} is not supported (logit_normal only)")
    unknown = sorted(set(kwargs) - set(HEAD_CONFIG_KEYS) - OTHER_KEYS)
    if unknown:
        raise UserError(f"{source}: unknown head settings {', '.join(unknown)}")
    fields = {ours: setting(kwargs, theirs, source, int) for theirs, ours in HEAD_CONFIG_KEYS.items()}
    if fields["parallel"] not in PARALLEL_CHOICES or fields["parallel"] == 1:
        raise UserError(f"{source}: parallel_num={fields['parallel']}; the T2I head is a patch head (4, 16 or 64)")
    return HeadConfig(**fields, attn_head_dim=128, bounded_output=True,
                      P_mean=setting(kwargs, "P_mean", source, default=0.0),  # the official DiffHead's defaults
                      P_std=setting(kwargs, "P_std", source, default=1.0),
                      time_shift=setting(kwargs, "time_shift", source, default=1.0),
                      diff_batch_mul=setting(kwargs, "diff_batch_mul", source, int, 1))


def _load_strict(module: nn.Module, state: dict, source: str, what: str, dtype: torch.dtype | None) -> nn.Module:
    """Fill a module built on the meta device with `state` (strict), in `dtype` (None: as stored).

    The tensors are adopted, not copied, and a dtype change replaces them one at a time: the 3.5 GB bf16 head is
    never held twice.
    """
    check_state_shapes(module, state, source, what)
    if dtype is not None:
        for k in list(state):
            state[k] = state[k].to(dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def read_t2i_head_config(folder: str | os.PathLike) -> HeadConfig:
    path = Path(folder) / HEAD_CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{folder} has no {HEAD_CONFIG_NAME}: not a BitDance T2I model folder")
    return head_config_from_official(read_json(path), str(path))


def load_t2i_head(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> DiffusionHead:
    """`vision_head_config.json` + `vision_head.safetensors` -> DiffusionHead (eval; dtype None: as stored)."""
    with torch.device("meta"):
        head = DiffusionHead(read_t2i_head_config(folder))
    path = Path(folder) / HEAD_WEIGHTS_NAME
    return _load_strict(head, read_safetensors(path), str(path), f"the head of {HEAD_CONFIG_NAME}", dtype)


def load_t2i_projector(folder: str | os.PathLike, token_bits: int = 32, dtype: torch.dtype | None = None) -> Projector:
    """`projector.safetensors` -> Projector; the LLM width is read from fc2's shape."""
    path = Path(folder) / PROJECTOR_WEIGHTS_NAME
    state = read_safetensors(path)
    if "fc2.weight" not in state or state["fc2.weight"].ndim != 2:
        raise UserError(f"{path} has no 2-D fc2.weight: not a BitDance projector")
    with torch.device("meta"):
        projector = Projector(ProjectorConfig(token_bits=token_bits, dim=int(state["fc2.weight"].shape[0])))
    return _load_strict(projector, state, str(path), "a projector", dtype)


def load_t2i_components(folder: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> T2IVisionComponents:
    """The tokenizer, diffusion head and projector of an official T2I folder, checked against each other.

    dtype None keeps the head and projector as stored (bf16 in the release, as the official pipeline runs them;
    pass torch.float32 for a CPU); the tokenizer is always fp32. The head's config is checked against the
    tokenizer before its 3.5 GB of weights are read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"T2I model folder not found: {folder}")
    tokenizer = ImageTokenizer.from_official(folder)
    bits, head_config = tokenizer.config.z_channels, read_t2i_head_config(folder)
    if head_config.token_bits != bits:
        raise UserError(f"{folder}: the head predicts {head_config.token_bits}-bit tokens, the tokenizer has {bits}")
    projector = load_t2i_projector(folder, token_bits=bits, dtype=dtype)
    if head_config.cond_dim != projector.config.dim:
        raise UserError(f"{folder}: the head's condition width {head_config.cond_dim} is not the projector's "
                        f"LLM width {projector.config.dim}")
    head = load_t2i_head(folder, dtype=dtype)
    return T2IVisionComponents(tokenizer.to(device), head.to(device), projector.to(device))


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(n,) positions -> (n, dim): dim/2 sines then dim/2 cosines, omega_i = 1 / 10000^(i / (dim/2)).

    fp32 in the official order of operations (arange / half, then 1 / 10000^omega, then the outer product).
    """
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32) / (dim / 2.0))  # (half,)
    angles = positions.float()[:, None] * omega[None]  # (n, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_positions(grid_h: int, grid_w: int, dim: int, parallel: int = 1) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2D positions in patch order: [emb(column) | emb(row)], dim/2 each (ref §3.2).

    The T2I pipeline adds row i of this table to the projected token i (in generation order) and to the head's
    condition for target token i.
    """
    if dim % 4:
        raise UserError(f"the sin-cos width must be divisible by 4, got {dim}")
    side = math.isqrt(parallel) if parallel in PARALLEL_CHOICES else 0
    if not side or grid_h % side or grid_w % side:
        raise UserError(f"a {grid_h}x{grid_w} grid cannot be cut into patches of parallel={parallel} "
                        f"(choices {PARALLEL_CHOICES}, grid sides divisible by sqrt(parallel))")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (h, w) each
    table = torch.cat([sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)], dim=-1)
    return table[patch_order(grid_h, grid_w, parallel)]  # raster -> patch order
