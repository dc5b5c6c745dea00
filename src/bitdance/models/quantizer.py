"""Quantizers for the image tokenizer: binary (group-wise lookup-free) and a product VQ baseline.

BinaryQuantizer follows the official training-time quantizer (ref §2.3, "group-wise lookup-free
quantization", itself from MAGVIT-2 LFQ / WeTok): every latent channel is thresholded to ±1, channels are
split in groups of `group_size` bits, and an entropy loss over the 2^g sub-codes of each group pushes
every token to a confident code (low per-sample entropy) while the batch spreads over all codes (high
codebook entropy). VQQuantizer is the index-based baseline at the same number of bits per token.

Channel convention for codes and indices (used everywhere in bitdance):
    codes   (b, k, *spatial)      float, channel axis 1, k = G * g bits
    indices (b, G, *spatial)      long, group i holds channels [i*g, (i+1)*g)
    inside a group, bit j (channel i*g + j) has weight 2^j and is set when code > 0 (little endian).

Letters: b batch, k bits per token, G groups, g bits per group (group_size), K = 2^g codes per group,
m tokens (b * h * w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitdance.utils import UserError, fp32_island

# ----------------------------------------------------------------------------------------------
# Bits <-> indices
# ----------------------------------------------------------------------------------------------

MAX_INDEX_BITS = 62  # indices are int64; keep clear of the sign bit


def _check_groups(k: int, group_size: int) -> int:
    if group_size < 1 or group_size > MAX_INDEX_BITS:
        raise UserError(f"group_size must be in 1..{MAX_INDEX_BITS}, got {group_size}")
    if k % group_size:
        raise UserError(f"{k} bits per token cannot be split in groups of {group_size} bits")
    return k // group_size


def bits_to_indices(codes: torch.Tensor, group_size: int, dim: int = 1) -> torch.Tensor:
    """±1 codes (b, k, ...) -> long indices (b, k/g, ...): little endian per group, bit = (code > 0)."""
    codes = codes.movedim(dim, -1)  # (..., k)
    groups = _check_groups(codes.shape[-1], group_size)
    bits = (codes > 0).long().unflatten(-1, (groups, group_size))  # (..., G, g)
    weights = 2 ** torch.arange(group_size, device=codes.device, dtype=torch.long)  # (g,)
    return (bits * weights).sum(-1).movedim(-1, dim)  # (b, G, ...)


def indices_to_bits(
    indices: torch.Tensor, group_size: int, dim: int = 1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Long indices (b, G, ...) -> ±1 codes (b, G*g, ...), the inverse of `bits_to_indices`."""
    _check_groups(group_size, group_size)
    idx = indices.long().movedim(dim, -1)  # (..., G)
    weights = 2 ** torch.arange(group_size, device=indices.device, dtype=torch.long)  # (g,)
    bits = (idx.unsqueeze(-1) & weights) != 0  # (..., G, g)
    codes = bits.to(dtype) * 2 - 1
    return codes.flatten(-2).movedim(-1, dim)  # (b, k, ...)


def all_codes(group_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Every code of one group, (2^g, g) in ±1, row r being the code whose index is r."""
    idx = torch.arange(2**group_size, device=device)
    return indices_to_bits(idx, group_size, dim=-1, dtype=dtype).view(2**group_size, group_size)


# ----------------------------------------------------------------------------------------------
# Config and output
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizerConfig:
    bits: int = 32  # k: latent channels = bits per token
    group_size: int = 8  # g: bits per group (sub-codebook of 2^g entries); k % g == 0
    kind: str = "binary"  # "binary" | "vq"
    # binary: entropy loss (official GFQ values)
    temperature: float = 0.01  # softmax(logits / T) over the 2^g codes
    sample_entropy_weight: float = 1.0
    codebook_entropy_weight: float = 1.0
    pool_groups: bool = False  # True: official GFQ pools the batch-mean distribution over groups too
    max_entropy_elements: int = 2**22  # chunk tokens x groups x 2^g above this (memory bound)
    # weights of the default aux loss `QuantizerOutput.loss` (WeTok lineage: entropy 0.1, commitment 0.25)
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25  # binary: commitment weight; vq: beta
    # vq: a codeword whose running usage falls below restart_threshold x uniform is moved onto a badly
    # quantized latent of the batch (0 disables)
    restart_threshold: float = 0.03
    usage_decay: float = 0.95

    @property
    def num_groups(self) -> int:
        return _check_groups(self.bits, self.group_size)

    @property
    def codebook_size(self) -> int:
        return 2**self.group_size


@dataclass
class QuantizerOutput:
    codes: torch.Tensor  # (b, k, h, w): ±1 (binary) / quantized latent (vq); straight-through in training
    indices: torch.Tensor  # (b, G, h, w) long
    loss: torch.Tensor  # scalar: the weighted auxiliary loss to add to the reconstruction loss
    commitment: torch.Tensor  # scalar: MSE(latent, sg[quantized])
    entropy_loss: torch.Tensor  # scalar (binary): w_s * sample_entropy - w_c * codebook_entropy
    sample_entropy: torch.Tensor  # scalar (binary): mean over tokens and groups of H(p)
    codebook_entropy: torch.Tensor  # scalar (binary): H of the batch-mean p (mean over groups)
    codebook_loss: torch.Tensor  # scalar (vq): MSE(sg[latent], quantized)
    perplexity: torch.Tensor  # scalar: exp(H(index histogram)) per group, mean over groups (no grad)
    usage: torch.Tensor  # scalar: fraction of the 2^g codes used in the batch, mean over groups (no grad)


@torch.no_grad()
def index_usage(indices: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, used fraction) of indices (b, G, ...), each averaged over the G groups."""
    per_group = indices.transpose(0, 1).reshape(indices.shape[1], -1)  # (G, m)
    perp, used = [], []
    for row in per_group:
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / counts.sum()
        perp.append(torch.exp(-(p * p.log()).sum()))
        used.append(torch.tensor(counts.numel() / codebook_size, dtype=torch.float64))
    return torch.stack(perp).mean().float(), torch.stack(used).mean().float()


def _to_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, k, h, w) -> (m, G, g), m = b*h*w."""
    x = x.movedim(1, -1).reshape(-1, x.shape[1])  # (m, k)
    return x.unflatten(-1, (groups, -1))  # (m, G, g)


# ----------------------------------------------------------------------------------------------
# Binary quantizer
# ----------------------------------------------------------------------------------------------


def _entropy_chunk(x: torch.Tensor, codebook: torch.Tensor, temperature: float):
    """x (r, G, g) -> (sum over rows of p: (G, K), sum over rows and groups of H(p): scalar)."""
    logits = 2.0 * torch.einsum("rgd,kd->rgk", x, codebook)  # (r, G, K): 2<x, c>
    logp = F.log_softmax(logits / temperature, dim=-1)  # (r, G, K)
    p = logp.exp()
    return p.sum(0), -(p * logp).sum()


class _ChunkedEntropy(torch.autograd.Function):
    """Sums of `_entropy_chunk` over row chunks, recomputing each chunk in backward (activation
    checkpointing by hand: torch.utils.checkpoint would import torch._dynamo, seconds on a small CPU)."""

    @staticmethod
    def forward(ctx, x, codebook, temperature, rows):
        ctx.save_for_backward(x, codebook)
        ctx.temperature, ctx.rows = temperature, rows
        prob_sum, ent_sum = x.new_zeros(x.shape[1], codebook.shape[0]), x.new_zeros(())
        for chunk in x.split(rows):
            ps, es = _entropy_chunk(chunk, codebook, temperature)
            prob_sum, ent_sum = prob_sum + ps, ent_sum + es
        return prob_sum, ent_sum

    @staticmethod
    def backward(ctx, grad_prob_sum, grad_ent_sum):
        x, codebook = ctx.saved_tensors
        grads = []
        with torch.enable_grad(), fp32_island(x.device.type):
            for chunk in x.detach().split(ctx.rows):
                chunk.requires_grad_(True)
                ps, es = _entropy_chunk(chunk, codebook, ctx.temperature)
                surrogate = (ps * grad_prob_sum).sum() + es * grad_ent_sum  # vector-Jacobian product
                grads.append(torch.autograd.grad(surrogate, chunk)[0])
        return torch.cat(grads), None, None, None


def entropy_terms(
    x: torch.Tensor, temperature: float = 0.01, pool_groups: bool = False, max_elements: int = 2**22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample and codebook entropy of the latent tokens x (m, G, g), in fp32.

    p = softmax(2<x, c> / T) over the 2^g codes c of each group. Returns (mean over tokens and groups of
    H(p), H of the batch-mean p averaged over groups). When the (m, G, 2^g) probability table is larger
    than `max_elements`, it is built in row chunks and each chunk is recomputed in backward, so the memory
    held is one chunk, not the whole table.
    """
    m, groups, g = x.shape
    codebook = all_codes(g, device=x.device, dtype=x.dtype)  # (K, g)
    rows = max(1, max_elements // (groups * 2**g))
    if m > rows:
        prob_sum, ent_sum = _ChunkedEntropy.apply(x, codebook, temperature, rows)
    else:
        prob_sum, ent_sum = _entropy_chunk(x, codebook, temperature)
    avg = prob_sum / m  # (G, K)
    if pool_groups:
        avg = avg.mean(0, keepdim=True)  # (1, K)
    codebook_entropy = -(avg * torch.log(avg + 1e-5)).sum(-1).mean()  # eps 1e-5 as in the official loss
    sample_entropy = ent_sum / (m * groups)
    return sample_entropy, codebook_entropy


class BinaryQuantizer(nn.Module):
    """sign(x) with 0 -> -1, straight-through gradient, group-wise entropy loss and commitment loss.

    Holds no parameters and no persistent buffers (so official checkpoints have no quantizer keys).
    Losses are computed in training mode (as in the official GFQ) or when `compute_loss=True`.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        self.num_groups = config.num_groups  # validates bits % group_size
        if config.group_size > 24:
            raise UserError(f"group_size {config.group_size} is too large for the entropy loss: use <= 24")

    @staticmethod
    def quantize(x: torch.Tensor) -> torch.Tensor:
        """Hard codes: +1 where x > 0, else -1 (so an exact 0 gives -1)."""
        return torch.where(x > 0, 1.0, -1.0).to(torch.float32)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return indices_to_bits(indices, self.config.group_size)

    def forward(self, x: torch.Tensor, compute_loss: bool | None = None) -> QuantizerOutput:
        cfg = self.config
        compute_loss = self.training if compute_loss is None else compute_loss
        with fp32_island(x.device.type):
            x = x.float()  # (b, k, h, w)
            q = self.quantize(x)  # (b, k, h, w) exactly ±1
            # straight-through: forward value is exactly q (x - x.detach() == 0), gradient is identity.
            # (The official x + (q - x).detach() can round to 0.99999994; this form cannot.)
            codes = q + (x - x.detach()) if x.requires_grad else q
            indices = bits_to_indices(q, cfg.group_size)  # (b, G, h, w)
            zero = x.new_zeros(())
            sample_h = codebook_h = entropy = commitment = zero
            if compute_loss:
                tokens = _to_tokens(x, self.num_groups)  # (m, G, g)
                sample_h, codebook_h = entropy_terms(
                    tokens, cfg.temperature, cfg.pool_groups, cfg.max_entropy_elements
                )
                entropy = cfg.sample_entropy_weight * sample_h - cfg.codebook_entropy_weight * codebook_h
                # averaged over the whole batch (the official subset-average is a bug, ref §8)
                commitment = F.mse_loss(x, q)
            loss = cfg.entropy_weight * entropy + cfg.commitment_weight * commitment
        perplexity, usage = index_usage(indices, cfg.codebook_size)
        return QuantizerOutput(
            codes=codes,
            indices=indices,
            loss=loss,
            commitment=commitment,
            entropy_loss=entropy,
            sample_entropy=sample_h,
            codebook_entropy=codebook_h,
            codebook_loss=zero,
            perplexity=perplexity,
            usage=usage,
        )


# ----------------------------------------------------------------------------------------------
# Product VQ baseline
# ----------------------------------------------------------------------------------------------


class VQQuantizer(nn.Module):
    """Product vector quantizer at the same bits per token as the binary one.

    The k latent channels are split in G = k/g groups; each group is replaced by the nearest of 2^g learned
    g-dim codewords (one codebook per group), so a token costs G indices of g bits = k bits. Codewords and
    latents are l2-normalised per group (cosine lookup, as in ViT-VQGAN / LlamaGen). Loss: codebook MSE +
    beta * commitment MSE, straight-through. Early in training the encoder's outputs crowd a small part of the
    sphere and most codewords go unused (perplexity ~10 of 256 per group on Fashion-MNIST), so in training
    codewords with a low running usage are restarted on the worst-quantized latents of the batch:
    deterministic, and identical on every DDP rank (usage is all-reduced, replacements come from rank 0).
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        self.num_groups = config.num_groups
        if config.group_size > 20:
            raise UserError(f"group_size {config.group_size} is too large for a VQ codebook: use <= 20")
        # random directions on the unit sphere; the official tokenizer has no VQ, so this name is ours
        self.codebook = nn.Parameter(torch.randn(self.num_groups, config.codebook_size, config.group_size))
        # running usage per codeword relative to uniform (1.0); training statistics only, not saved
        self.register_buffer("usage_ema", torch.ones(self.num_groups, config.codebook_size), persistent=False)

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook.float(), dim=-1)  # (G, K, g)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, G, h, w) long -> quantized latent (b, k, h, w)."""
        book = self.normalized_codebook()  # (G, K, g)
        idx = indices.movedim(1, -1)  # (b, h, w, G)
        groups = torch.arange(self.num_groups, device=indices.device)
        codes = book[groups, idx]  # (b, h, w, G, g)
        return codes.flatten(-2).movedim(-1, 1)  # (b, k, h, w)

    @torch.no_grad()
    def _nearest(self, z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """z (m, G, g), book (G, K, g) -> argmax cosine (m, G); chunked so m x G x K stays bounded."""
        rows = max(1, self.config.max_entropy_elements // (self.num_groups * book.shape[1]))
        out = [torch.einsum("mgd,gkd->mgk", chunk, book).argmax(-1) for chunk in z.split(rows)]
        return torch.cat(out)

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, zq: torch.Tensor, idx: torch.Tensor) -> None:
        """z, zq (m, G, g), idx (m, G): update the usage EMA, move rarely used codewords onto bad latents."""
        import torch.distributed as dist

        cfg, (m, groups, _) = self.config, z.shape
        ones = torch.ones_like(idx.t(), dtype=z.dtype)
        counts = torch.zeros_like(self.usage_ema).scatter_add_(1, idx.t(), ones)  # (G, K)
        total = torch.tensor([float(m)], device=z.device)
        ddp = dist.is_available() and dist.is_initialized()
        if ddp:
            dist.all_reduce(counts)
            dist.all_reduce(total)
        rate = counts * (cfg.codebook_size / total)  # 1.0 = uniform use
        self.usage_ema.mul_(cfg.usage_decay).add_(rate, alpha=1 - cfg.usage_decay)
        dead = self.usage_ema < cfg.restart_threshold  # (G, K), the same on every rank
        if not dead.any():
            return
        error = (z - zq).pow(2).sum(-1)  # (m, G): distance to the chosen codeword
        new = self.codebook.data.clone()  # (G, K, g)
        for grp in range(groups):
            slots = dead[grp].nonzero().squeeze(1)
            if slots.numel():
                worst = error[:, grp].topk(min(slots.numel(), m)).indices  # the worst-quantized latents
                new[grp, slots] = z[worst.repeat(slots.numel() // worst.numel() + 1)[: slots.numel()], grp]
        if ddp:
            dist.broadcast(new, src=0)
        # Known and accepted: only the values move. The optimizer (which this module cannot see) keeps the old
        # codeword's Adam moments for a restarted row. A dead row got little gradient lately, so its first moment
        # has mostly decayed, but a second moment left from earlier use damps its first steps on the new spot.
        self.codebook.data[dead] = new[dead].to(self.codebook.dtype)
        self.usage_ema[dead] = 1.0

    def forward(self, x: torch.Tensor, compute_loss: bool | None = None) -> QuantizerOutput:
        cfg = self.config
        compute_loss = self.training if compute_loss is None else compute_loss
        b, k, h, w = x.shape
        with fp32_island(x.device.type):
            z = F.normalize(_to_tokens(x.float(), self.num_groups), dim=-1)  # (m, G, g)
            book = self.normalized_codebook()  # (G, K, g)
            idx = self._nearest(z.detach(), book.detach())  # (m, G)
            groups = torch.arange(self.num_groups, device=x.device)
            zq = book[groups, idx]  # (m, G, g), gradient flows to the codebook
            zero = z.new_zeros(())
            codebook_loss = commitment = zero
            if compute_loss:
                codebook_loss = F.mse_loss(zq, z.detach())
                commitment = F.mse_loss(z, zq.detach())
            zq_st = z + (zq - z).detach()  # straight-through to the encoder
            codes = zq_st.flatten(-2).view(b, h, w, k).permute(0, 3, 1, 2)  # (b, k, h, w)
            indices = idx.view(b, h, w, self.num_groups).permute(0, 3, 1, 2)  # (b, G, h, w)
            loss = codebook_loss + cfg.commitment_weight * commitment
            restart = self.training and torch.is_grad_enabled() and cfg.restart_threshold > 0
            if restart and self.codebook.requires_grad:
                # after the lookup, so this step's outputs are unchanged. A frozen codebook (a decoder-only
                # fine-tune) never moves: its codes are what a trained generator speaks
                self._restart_dead_codes(z.detach(), zq.detach(), idx)
        perplexity, usage = index_usage(indices, cfg.codebook_size)
        return QuantizerOutput(
            codes=codes,
            indices=indices,
            loss=loss,
            commitment=commitment,
            entropy_loss=zero,
            sample_entropy=zero,
            codebook_entropy=zero,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
            usage=usage,
        )


QUANTIZERS = {"binary": BinaryQuantizer, "vq": VQQuantizer}


def build_quantizer(config: QuantizerConfig) -> nn.Module:
    if config.kind not in QUANTIZERS:
        raise UserError(f"unknown quantizer {config.kind!r}; choose one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[config.kind](config)
