import math

import pytest
import torch
import torch.nn.functional as F

from bitdance.models.quantizer import (
    BinaryQuantizer,
    QuantizerConfig,
    VQQuantizer,
    all_codes,
    bits_to_indices,
    entropy_terms,
    indices_to_bits,
)
from bitdance.utils import UserError


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_codes_are_exactly_pm1_and_zero_maps_to_minus_one():
    q = BinaryQuantizer(QuantizerConfig(bits=16, group_size=8)).train()
    x = torch.randn(2, 16, 3, 3, generator=_gen()) * 3
    x[0, :, 0, 0] = 0.0
    x.requires_grad_(True)
    out = q(x)
    assert set(out.codes.detach().unique().tolist()) == {-1.0, 1.0}
    # exactly the sign, not 0.99999994 from x + (q - x).detach()
    assert torch.equal(out.codes.detach(), torch.where(x > 0, 1.0, -1.0))
    assert (out.codes[0, :, 0, 0] == -1).all()
    zeros = q.eval()(torch.zeros(1, 16, 2, 2))
    assert (zeros.codes == -1).all() and (zeros.indices == 0).all()


@pytest.mark.parametrize("group_size,bits", [(1, 3), (4, 8), (8, 32), (16, 16), (5, 10)])
def test_bits_indices_round_trip(group_size, bits):
    codes = torch.where(torch.randn(3, bits, 2, 5, generator=_gen(group_size)) > 0, 1.0, -1.0)
    idx = bits_to_indices(codes, group_size)
    assert idx.shape == (3, bits // group_size, 2, 5) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 2**group_size
    assert torch.equal(indices_to_bits(idx, group_size), codes)
    # and the other way round, on every index of one group
    every = torch.arange(2**group_size).view(1, 1, -1) if group_size <= 8 else idx[:, :1]
    assert torch.equal(bits_to_indices(indices_to_bits(every, group_size), group_size), every)


def test_little_endian_per_group_and_dim_argument():
    codes = -torch.ones(1, 16)  # (b, k) token layout
    codes[0, 0] = 1  # group 0, bit 0 -> 1
    codes[0, 8 + 3] = 1  # group 1, bit 3 -> 8
    codes[0, 8 + 7] = 1  # group 1, bit 7 -> 128
    assert bits_to_indices(codes, 8, dim=-1).tolist() == [[1, 136]]
    assert torch.equal(all_codes(2), torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]))


def test_straight_through_gradient_is_identity():
    q = BinaryQuantizer(QuantizerConfig(bits=8, group_size=4)).train()
    x = torch.randn(2, 8, 2, 2, generator=_gen(), requires_grad=True)
    w = torch.randn(2, 8, 2, 2, generator=_gen(1))
    (q(x).codes * w).sum().backward()
    assert torch.allclose(x.grad, w)


def _naive_entropy(x, T=0.01, pool_groups=False):
    """The MAGVIT-2 entropy terms written out on (m, G, g) tokens. The codebook entropy is per group (H of each
    group's batch-mean p, averaged over groups: our default), or with `pool_groups` H of the batch-mean p pooled
    over tokens and groups alike, which is what the official gfq.py computes."""
    C = all_codes(x.shape[-1])
    p = F.softmax(2 * torch.einsum("mgd,kd->mgk", x, C) / T, dim=-1)  # (m, G, K)
    sample = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    if pool_groups:
        avg = p.mean((0, 1))  # (K,)
        return sample, -(avg * torch.log(avg + 1e-5)).sum()
    avg = p.mean(0)  # (G, K)
    book = -(avg * torch.log(avg + 1e-5)).sum(-1).mean()
    return sample, book


def test_entropy_matches_formula_and_chunking_is_exact():
    x = (torch.randn(40, 2, 6, generator=_gen()) * 0.02).requires_grad_(True)  # soft probabilities
    s_ref, b_ref = _naive_entropy(x)
    s, b = entropy_terms(x)
    assert torch.allclose(s, s_ref, atol=1e-5) and torch.allclose(b, b_ref, atol=1e-5)
    g_full = torch.autograd.grad(s - b, x)[0]
    s_c, b_c = entropy_terms(x, max_elements=2 * 64 * 3)  # 3 rows per chunk, checkpointed
    g_chunk = torch.autograd.grad(s_c - b_c, x)[0]
    assert torch.allclose(s_c, s, atol=1e-6) and torch.allclose(b_c, b, atol=1e-6)
    assert torch.allclose(g_chunk, g_full, rtol=1e-4, atol=1e-5) and g_full.abs().sum() > 0


def test_pooled_codebook_entropy_matches_the_official_pooled_formula():
    x = torch.randn(40, 3, 4, generator=_gen(2)) * 0.02
    x[:, 0] += 0.05  # groups that prefer different codes: pooling then differs from the per-group mean
    s_ref, b_ref = _naive_entropy(x, pool_groups=True)
    s, b = entropy_terms(x, pool_groups=True)
    assert torch.allclose(s, s_ref, atol=1e-5) and torch.allclose(b, b_ref, atol=1e-5)
    assert not torch.allclose(b, entropy_terms(x)[1], atol=1e-3)  # the two modes are not the same number
    s_c, b_c = entropy_terms(x, pool_groups=True, max_elements=3 * 16 * 7)  # chunked: the same
    assert torch.allclose(s_c, s, atol=1e-6) and torch.allclose(b_c, b, atol=1e-6)


def test_entropy_loss_prefers_balanced_codes_to_collapsed():
    cfg = QuantizerConfig(bits=8, group_size=4)
    q = BinaryQuantizer(cfg).train()
    varied = torch.randn(8, 8, 4, 4, generator=_gen()).sign() * 0.5  # confident, spread over codes
    collapsed = torch.ones(8, 8, 4, 4) * 0.5  # every token the same code
    out_v, out_c = q(varied), q(collapsed)
    assert out_v.entropy_loss < out_c.entropy_loss - 1.0
    assert out_v.codebook_entropy > math.log(16) - 0.2  # near the maximum log 2^g
    assert out_c.codebook_entropy < 0.01 and out_c.perplexity == 1.0
    assert out_v.sample_entropy < 1e-3  # |x| = 0.5 with T = 0.01: one-hot probabilities


def test_entropy_and_codes_stay_fp32_under_bf16_autocast():
    q = BinaryQuantizer(QuantizerConfig(bits=8, group_size=8)).train()
    x = (torch.randn(2, 8, 4, 4, generator=_gen()) * 0.01).to(torch.bfloat16)
    ref = q(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    for t in (out.codes, out.sample_entropy, out.codebook_entropy, out.loss):
        assert t.dtype == torch.float32
    assert torch.allclose(out.sample_entropy, ref.sample_entropy, atol=1e-6)
    assert torch.allclose(out.codebook_entropy, ref.codebook_entropy, atol=1e-6)


def test_commitment_is_averaged_over_the_whole_batch_and_losses_only_in_training():
    cfg = QuantizerConfig(bits=4, group_size=4)
    q = BinaryQuantizer(cfg).train()
    x = torch.randn(3, 4, 2, 2, generator=_gen())
    out = q(x)
    assert torch.allclose(out.commitment, ((x - x.sign()) ** 2).mean())
    entropy = out.sample_entropy - out.codebook_entropy
    expected = cfg.entropy_weight * entropy + cfg.commitment_weight * out.commitment
    assert torch.allclose(out.loss, expected)
    assert q.eval()(x).loss == 0


@pytest.mark.parametrize("bits,group_size", [(16, 16), (4, 4), (6, 3)])
def test_single_and_small_groups(bits, group_size):
    q = BinaryQuantizer(QuantizerConfig(bits=bits, group_size=group_size, max_entropy_elements=2**16)).train()
    x = torch.randn(2, bits, 4, 4, generator=_gen(), requires_grad=True)
    out = q(x)
    out.loss.backward()
    assert out.indices.shape == (2, bits // group_size, 4, 4)
    assert torch.isfinite(out.loss) and x.grad.abs().sum() > 0


def test_bad_group_size_is_a_user_error():
    with pytest.raises(UserError, match="groups of 8"):
        BinaryQuantizer(QuantizerConfig(bits=12, group_size=8))


def test_vq_quantizer_same_bits_per_token_and_valid_indices():
    cfg = QuantizerConfig(bits=16, group_size=8, kind="vq")
    vq = VQQuantizer(cfg).train()
    x = torch.randn(2, 16, 4, 4, generator=_gen(), requires_grad=True)
    out = vq(x)
    assert out.codes.shape == x.shape and out.indices.shape == (2, 2, 4, 4)
    assert out.indices.min() >= 0 and out.indices.max() < 256
    # codes are the (normalised) codewords of the indices, one group after the other
    assert torch.allclose(vq.indices_to_codes(out.indices), out.codes, atol=1e-6)
    # and each is the nearest codeword (max cosine) of its group
    z = F.normalize(x.detach().movedim(1, -1).reshape(-1, 2, 8), dim=-1)
    sims = torch.einsum("mgd,gkd->mgk", z, vq.normalized_codebook().detach())
    assert torch.equal(sims.argmax(-1), out.indices.movedim(1, -1).reshape(-1, 2))
    out.loss.backward()
    assert x.grad.abs().sum() > 0 and vq.codebook.grad.abs().sum() > 0
    assert 1.0 <= out.perplexity <= 256 and 0 < out.usage <= 1


def test_vq_restarts_unused_codewords_on_badly_quantized_latents():
    cfg = QuantizerConfig(bits=8, group_size=4, kind="vq", usage_decay=0.5, restart_threshold=0.2)
    torch.manual_seed(0)
    vq = VQQuantizer(cfg)
    x = torch.randn(4, 8, 4, 4, generator=_gen()) * 0.5 + 1.0  # latents crowd one part of the sphere
    vq.eval()
    first = vq(x, compute_loss=True)
    book = vq.codebook.detach().clone()
    vq(x)
    assert torch.equal(vq.codebook, book)  # eval passes never touch the codebook
    vq.train()
    for _ in range(4):
        vq(x)
    assert not torch.equal(vq.codebook, book)
    after = vq.eval()(x, compute_loss=True)
    assert after.perplexity > first.perplexity
    assert after.commitment < first.commitment  # latents are closer to their codewords


def test_vq_frozen_codebook_is_never_restarted():
    """A decoder-only fine-tune freezes the quantizer but trains in train mode: dead codewords must stay put."""
    cfg = QuantizerConfig(bits=8, group_size=4, kind="vq", usage_decay=0.5, restart_threshold=0.2)
    torch.manual_seed(0)
    vq = VQQuantizer(cfg).train().requires_grad_(False)
    x = torch.randn(4, 8, 4, 4, generator=_gen()) * 0.5 + 1.0  # as above: most codewords go unused
    book = vq.codebook.detach().clone()
    for _ in range(4):
        vq(x)
    assert torch.equal(vq.codebook, book)
