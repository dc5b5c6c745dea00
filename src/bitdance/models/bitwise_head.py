"""Per-bit classification head: the ablation baseline for the binary diffusion head.

Infinity's "infinite-vocabulary classifier": one linear layer maps the backbone's condition to two logits per
bit (bit = -1 / bit = +1), trained with a per-bit cross-entropy. Each bit is sampled independently, so the
head cannot model correlations between the bits of a token; that is what the diffusion head adds.

Same interface as `DiffusionHead` (built from the same `HeadConfig`; the flow fields are unused).
Letters: b batch, p tokens per patch, k bits per token, d condition width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitdance.flow import check_temperature
from bitdance.models.diffusion_head import HeadConfig, check_head_inputs, check_sample_inputs, validate_head_config
from bitdance.utils import fp32_island, random_on


class BitwiseHead(nn.Module):
    """loss(cond (b, p, d), target (b, p, k)) -> scalar; sample(cond (m, p, d), ...) -> (b, p, k) ±1."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        validate_head_config(config, flow=False)
        self.config = config
        self.linear = nn.Linear(config.cond_dim, 2 * config.token_bits)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logits(self, cond: torch.Tensor) -> torch.Tensor:
        """(m, p, d) -> (m, p, k, 2) logits, index 0 for bit -1 and index 1 for bit +1; fp32."""
        w = self.linear.weight
        out = self.linear(cond.to(w.dtype)).float()  # (m, p, 2 k)
        return out.view(*cond.shape[:2], self.config.token_bits, 2)

    def loss(
        self,
        cond: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Mean per-bit cross-entropy. Deterministic, so diff_batch_mul repeats would change nothing."""
        check_head_inputs(self.config, cond, target)
        with fp32_island(cond.device.type):
            logits = self.logits(cond.float())  # (b, p, k, 2)
            labels = (target > 0).long()  # (b, p, k): +1 -> class 1
            ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none")
            ce = ce.view(labels.shape)  # (b, p, k)
            if reduction == "mean":
                return ce.mean()
            if reduction == "none":
                return ce.mean(dim=-1)  # (b, p)
            raise ValueError(f"unknown reduction {reduction!r}")

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        num_steps: int | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        *,
        temperature: float | None = None,
        guide: tuple[BitwiseHead, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Each bit drawn from softmax(logits / temperature); num_steps is ignored (one shot).

        cfg_scale float: cond is [cond; uncond] and logits mix as u + s (c - u). temperature None: the config's;
        0: argmax. guide = (guide_head, guide_cond), with a float cfg_scale: autoguidance, u is the guide head's
        logits on its own condition and cond is (b, p, d).
        """
        check_sample_inputs(self.config, cond, cfg_scale, guide)
        with fp32_island(cond.device.type):
            logits = self.logits(cond.float())  # (m, p, k, 2)
            if guide is not None:
                guide_head, guide_cond = guide
                lc, lu = logits, guide_head.logits(guide_cond.float())
                logits = lu + cfg_scale * (lc - lu)  # (b, p, k, 2)
            elif cfg_scale is not None:
                lc, lu = logits.chunk(2, dim=0)
                logits = lu + cfg_scale * (lc - lu)  # (b, p, k, 2)
            diff = logits[..., 1] - logits[..., 0]  # (b, p, k): log-odds of bit +1
            temp = check_temperature(self.config.temperature if temperature is None else temperature)
            if temp == 0:
                return torch.where(diff > 0, 1.0, -1.0)
            p_one = torch.sigmoid(diff / temp)  # softmax over 2 classes at this temperature
            u = random_on("uniform", p_one.shape, generator, cond.device)
            return torch.where(u < p_one, 1.0, -1.0)
