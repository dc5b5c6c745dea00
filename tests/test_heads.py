"""DiffusionHead (1x MLP and patch-attention nets) and BitwiseHead: layout, init, loss, fitting, sampling."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bitdance.models.bitwise_head import BitwiseHead
from bitdance.models.diffusion_head import HEAD_PRESETS, DiffusionHead, HeadConfig
from bitdance.utils import UserError, count_parameters


def tiny(parallel=1, **kw):
    return replace(HEAD_PRESETS["tiny"](), parallel=parallel, **kw)


# ----------------------------------------------------------------------------------------------
# An independent description of the official `head.net` (ref §4.1, §6.2): key names and shapes,
# and a functional forward over such a state dict.
# ----------------------------------------------------------------------------------------------


def official_shapes(k, d, D, depth, n_ada, parallel):
    h = int(1.5 * D)
    s = {"net.input_proj.weight": (D, k), "net.input_proj.bias": (D,),
         "net.time_embed.mlp.0.weight": (D, 256), "net.time_embed.mlp.0.bias": (D,),
         "net.time_embed.mlp.2.weight": (D, D), "net.time_embed.mlp.2.bias": (D,),
         "net.cond_embed.weight": (D, d), "net.cond_embed.bias": (D,),
         "net.final_layer.ada_ln_modulation.weight": (2 * D, D),
         "net.final_layer.ada_ln_modulation.bias": (2 * D,),
         "net.final_layer.linear.weight": (k, D), "net.final_layer.linear.bias": (k,)}
    n_mod = 3 if parallel == 1 else 6
    for j in range(n_ada):
        s[f"net.ada_ln_blocks.{j}.weight"] = (n_mod * D, D)
        s[f"net.ada_ln_blocks.{j}.bias"] = (n_mod * D,)
    for j in range(depth):
        p = f"net.res_blocks.{j}."
        norms = ["norm"] if parallel == 1 else ["norm1", "norm2"]
        for nm in norms:
            s[p + nm + ".weight"] = (D,)
            s[p + nm + ".bias"] = (D,)
        if parallel > 1:
            s[p + "attn.wqkv.weight"], s[p + "attn.wqkv.bias"] = (3 * D, D), (3 * D,)
            s[p + "attn.wo.weight"], s[p + "attn.wo.bias"] = (D, D), (D,)
        s[p + "w1.weight"], s[p + "w1.bias"] = (2 * h, D), (2 * h,)
        s[p + "w2.weight"], s[p + "w2.bias"] = (D, h), (D,)
    return s


def reference_forward(sd, x, t, c, depth, n_ada, parallel, head_dim, bounded=False):
    """x (n, [p,] k), t (n,), c (n, [p,] d), written from the reference facts, not from our module."""
    lin = lambda name, v: v @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    ln = lambda v, name=None: F.layer_norm(  # noqa: E731
        v, v.shape[-1:], sd[name + ".weight"] if name else None, sd[name + ".bias"] if name else None, 1e-6)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    a = 1000 * t[:, None] * freqs
    temb = torch.cat([a.cos(), a.sin()], -1)
    temb = lin("net.time_embed.mlp.2", F.silu(lin("net.time_embed.mlp.0", temb)))
    if parallel > 1:
        temb = temb[:, None]
    y = F.silu(temb + lin("net.cond_embed", c))
    h = lin("net.input_proj", x)
    every = depth // n_ada

    def swiglu(p, v):
        u = lin(p + "w1", v)
        g, b = u[..., : u.shape[-1] // 2], u[..., u.shape[-1] // 2:]
        return lin(p + "w2", F.silu(g) * b)

    for j in range(depth):
        mods = lin(f"net.ada_ln_blocks.{j // every}", y).chunk(3 if parallel == 1 else 6, -1)
        p = f"net.res_blocks.{j}."
        if parallel == 1:
            scale, shift, gate = mods
            h = h + gate * swiglu(p, ln(h, p + "norm") * (1 + scale) + shift)
        else:
            s1, b1, g1, s2, b2, g2 = mods
            u = ln(h, p + "norm1") * (1 + s1) + b1
            q, k, v = lin(p + "attn.wqkv", u).chunk(3, -1)
            n, P, D = q.shape
            q, k, v = (w.view(n, P, D // head_dim, head_dim).transpose(1, 2) for w in (q, k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), -1) @ v
            h = h + g1 * lin(p + "attn.wo", att.transpose(1, 2).reshape(n, P, D))
            h = h + g2 * swiglu(p, ln(h, p + "norm2") * (1 + s2) + b2)
    scale, shift = lin("net.final_layer.ada_ln_modulation", y).chunk(2, -1)
    out = lin("net.final_layer.linear", ln(h) * (1 + scale) + shift)
    return 2 * torch.sigmoid(out) - 1 if bounded else out


@pytest.mark.parametrize("parallel", [1, 4])
def test_official_layout_loads_strict_and_computes_the_same(parallel):
    cfg = HeadConfig(token_bits=8, cond_dim=24, width=32, depth=4, num_adaln=2, parallel=parallel,
                     attn_head_dim=8, bounded_output=parallel > 1)
    shapes = official_shapes(8, 24, 32, 4, 2, parallel)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    head = DiffusionHead(cfg)
    head.load_state_dict(sd, strict=True)
    n = 3
    x = torch.randn(n, parallel, 8, generator=g)
    t = torch.rand(n, generator=g)
    c = torch.randn(n, parallel, 24, generator=g)
    got = head.forward_net(x, t, c)
    if parallel == 1:
        want = reference_forward(sd, x[:, 0], t, c[:, 0], 4, 2, 1, 8)[:, None]
    else:
        want = reference_forward(sd, x, t, c, 4, 2, parallel, 8, bounded=True)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,count,unit", [
    ("imagenet-b-1x", 22_106_144, 1), ("imagenet-b-4x", 39_833_120, 1), ("imagenet-b-16x", 39_833_120, 1),
    ("imagenet-l-1x", 48.6, 1e6), ("imagenet-h-1x", 110.3, 1e6),
    ("t2i-14b-16x", 1.758, 1e9), ("t2i-14b-64x", 1.758, 1e9),  # 3,516,928,064 bytes in bf16 (ref §4.1)
])
def test_parameter_counts_on_meta(name, count, unit):
    with torch.device("meta"):
        head = DiffusionHead(HEAD_PRESETS[name]())
    n = count_parameters(head)
    if unit == 1:
        assert n == count
    else:
        assert abs(n / unit - count) < 0.05 if unit == 1e6 else abs(n / unit - count) < 0.0005
    if name.startswith("t2i"):
        assert 2 * n == 3_516_928_064


def test_t2i_key_layout_on_meta():
    with torch.device("meta"):
        head = DiffusionHead(HEAD_PRESETS["t2i-14b-16x"]())
    sd = head.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(32, 5120, 5120, 6, 2, 16)
    assert tuple(sd["net.ada_ln_blocks.1.weight"].shape) == (30720, 5120)
    assert tuple(sd["net.final_layer.ada_ln_modulation.weight"].shape) == (10240, 5120)
    assert tuple(sd["net.res_blocks.5.attn.wqkv.weight"].shape) == (15360, 5120)
    assert tuple(sd["net.res_blocks.5.w2.weight"].shape) == (5120, 7680)
    assert head.net.res_blocks[0].attn.n_head == 40


@pytest.mark.parametrize("parallel,bounded", [(1, False), (4, False), (4, True)])
def test_fresh_head_outputs_exactly_zero(parallel, bounded):
    head = DiffusionHead(tiny(parallel, bounded_output=bounded))
    out = head.forward_net(torch.randn(5, parallel, 16), torch.rand(5), torch.randn(5, parallel, 64))
    assert out.abs().max() == 0


@pytest.mark.parametrize("kind", ["diffusion", "bitwise"])
@pytest.mark.parametrize("parallel", [1, 4])
def test_fit_a_few_tokens_then_sample_them(kind, parallel):
    torch.manual_seed(0)
    cfg = tiny(parallel)
    head = DiffusionHead(cfg) if kind == "diffusion" else BitwiseHead(cfg)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(8, parallel, 64, generator=g)
    target = torch.randn(8, parallel, 16, generator=g).sign()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = head.loss(cond, target, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    head.eval()
    bits = head.sample(cond, num_steps=20, cfg_scale=None, generator=torch.Generator().manual_seed(2))
    assert bits.shape == target.shape
    assert (bits == target).float().mean() > 0.9


@pytest.mark.parametrize("head_cls", [DiffusionHead, BitwiseHead])
@pytest.mark.parametrize("parallel", [1, 4])
def test_sample_shapes_bits_determinism_and_cfg(head_cls, parallel):
    head = head_cls(tiny(parallel))
    with torch.no_grad():  # a non-trivial net (the fresh diffusion head predicts 0 everywhere)
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cond = torch.randn(6, parallel, 64)

    def draw(seed, c=cond, cfg=None):
        return head.sample(c, num_steps=4, cfg_scale=cfg, generator=torch.Generator().manual_seed(seed))

    a = draw(0)
    assert a.shape == (6, parallel, 16) and set(a.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(a, draw(0)) and not torch.equal(a, draw(1))
    guided = draw(0, cfg=3.0)
    assert guided.shape == (3, parallel, 16) and set(guided.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError):
        draw(0, c=cond[:5], cfg=3.0)


def test_parallel_head_checks_patch_size():
    head = DiffusionHead(tiny(4))
    with pytest.raises(ValueError):
        head.sample(torch.randn(2, 3, 64), num_steps=2)
    with pytest.raises(ValueError):
        head.loss(torch.randn(2, 4, 64), torch.randn(2, 4, 8))


@pytest.mark.parametrize("depth, num_adaln", [(6, 4), (2, 4), (3, 2)])
def test_adaln_groups_must_divide_the_depth(depth, num_adaln):
    with pytest.raises(UserError, match="divisible by num_adaln"):
        DiffusionHead(HeadConfig(token_bits=8, cond_dim=16, width=16, depth=depth, num_adaln=num_adaln))


def test_head_under_bf16_autocast_runs_its_net_in_bf16():
    """The official head runs its net in the caller's autocast (bf16 on GPUs) and the loss and samples in fp32."""
    head = DiffusionHead(tiny(4))
    head.net.final_layer.linear.weight.data.normal_()  # make the prediction depend on the input
    seen = []
    head.net.res_blocks[0].w1.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    cond, target = torch.randn(3, 4, 64), torch.randn(3, 4, 16).sign()
    ref = head.loss(cond, target, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head.loss(cond.bfloat16(), target, generator=torch.Generator().manual_seed(0))
        bits = head.sample(torch.randn(2, 4, 64), num_steps=3, cfg_scale=1.5, generator=torch.Generator())
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=0.05)
    assert seen[0] == torch.float32 and set(seen[1:]) == {torch.bfloat16}
    assert bits.dtype == torch.float32 and bits.abs().eq(1).all()


def _record_net_inputs(net, seen):
    """Record (x shape, t shape) of every net evaluation: t is seen by time_embed, x by forward_embedded."""
    t_shapes = []
    orig_time, orig_fwd = net.time_embed.forward, net.forward_embedded
    net.time_embed.forward = lambda t: (t_shapes.append(t.shape), orig_time(t))[1]
    net.forward_embedded = lambda x, te, ce: (seen.append((x.shape, t_shapes[-1])), orig_fwd(x, te, ce))[1]


def test_loss_reduction_and_time_sharing():
    head = DiffusionHead(tiny(4, diff_batch_mul=2))
    seen = []
    _record_net_inputs(head.net, seen)
    cond, target = torch.randn(3, 4, 64), torch.randn(3, 4, 16).sign()
    per_tok = head.loss(cond, target, generator=torch.Generator().manual_seed(0), reduction="none")
    scalar = head.loss(cond, target, generator=torch.Generator().manual_seed(0))
    assert per_tok.shape == (3, 4) and torch.allclose(per_tok.mean(), scalar)
    assert seen[0] == (torch.Size([6, 4, 16]), torch.Size([6]))  # one t per repeated patch
    head1 = DiffusionHead(tiny(1, diff_batch_mul=2))
    seen.clear()
    _record_net_inputs(head1.net, seen)
    head1.loss(torch.randn(3, 4, 64), target)
    assert seen[0] == (torch.Size([24, 16]), torch.Size([24]))  # 1x: one t per token


def test_sampling_embeds_condition_once_per_call():
    """The sampler reuses the condition embedding across flow steps and gives the same bits as per-step
    embedding would (compared against a flow run over the plain forward_net)."""
    for parallel in (1, 4):
        head = DiffusionHead(tiny(parallel))
        for blk in head.net.ada_ln_blocks:
            blk.weight.data.normal_(std=0.1)
        head.net.final_layer.linear.weight.data.normal_()
        calls = []
        orig = head.net.cond_embed.forward
        head.net.cond_embed.forward = lambda c: (calls.append(1), orig(c))[1]
        cond = torch.randn(4, parallel, 64)
        fast = head.sample(cond, num_steps=6, cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
        assert len(calls) == 1
        slow = head.flow.sample(lambda z, t: head.forward_net(z, t, cond), shape=(2, parallel, 16), num_steps=6,
                                cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
        assert torch.equal(fast, slow)


def test_gradient_checkpointing_same_loss_and_grads():
    head = DiffusionHead(tiny(4))
    head.net.final_layer.linear.weight.data.normal_()
    for blk in head.net.ada_ln_blocks:
        blk.weight.data.normal_(std=0.1)
    cond, target = torch.randn(2, 4, 64), torch.randn(2, 4, 16).sign()
    l1 = head.loss(cond, target, generator=torch.Generator().manual_seed(0))
    g1 = torch.autograd.grad(l1, head.net.res_blocks[0].w1.weight)[0]
    head.net.gradient_checkpointing = True
    l2 = head.loss(cond, target, generator=torch.Generator().manual_seed(0))
    g2 = torch.autograd.grad(l2, head.net.res_blocks[0].w1.weight)[0]
    assert torch.allclose(l1, l2) and torch.allclose(g1, g2, atol=1e-6) and g1.abs().sum() > 0


def test_bitwise_cfg_and_temperature():
    head = BitwiseHead(tiny(1, temperature=0.0))  # temperature 0: argmax, so the mix is visible exactly
    cond = torch.randn(8, 1, 64)
    logits = head.logits(cond)
    lc, lu = logits.chunk(2)
    mixed = lu + 2.0 * (lc - lu)
    want = torch.where(mixed[..., 1] > mixed[..., 0], 1.0, -1.0)
    assert torch.equal(head.sample(cond, cfg_scale=2.0), want)
    # temperature 1: each bit is +1 with probability softmax(logits)[1]
    head = BitwiseHead(tiny(1))
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.tensor([0.0, math.log(4.0)]).repeat(16))  # p(+1) = 0.8
    bits = head.sample(torch.zeros(4000, 1, 64), generator=torch.Generator().manual_seed(0))
    assert abs((bits > 0).float().mean().item() - 0.8) < 0.01


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError):
        DiffusionHead(HeadConfig(depth=5, num_adaln=2))
    with pytest.raises(UserError):
        DiffusionHead(HeadConfig(parallel=4, width=100, attn_head_dim=64))
