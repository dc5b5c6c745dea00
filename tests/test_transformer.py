"""BitDance backbone: masks, token order, RoPE, teacher-forced vs incremental conditions, official layout, counts."""

import math

import pytest
import torch

from bitdance.models import transformer as T
from bitdance.models.transformer import BITDANCE_PRESETS, BitDance
from bitdance.utils import UserError


def randomize_head(model, seed=0):
    """The official head init zeroes its output layers, so a fresh head ignores its condition; randomise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def make(preset="tiny", parallel=1, seed=0, **kw):
    torch.manual_seed(seed)
    return BitDance(BITDANCE_PRESETS[preset](parallel=parallel, **kw))


def rand_tokens(b, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (b, cfg.num_tokens, cfg.token_bits), generator=g).float() * 2 - 1


# -- masks ------------------------------------------------------------------------------------


def brute_force_mask(num_tokens, class_tokens, parallel):
    """Official construction: causal, then from position C-1 on, unmask each P x P diagonal block."""
    L = num_tokens + class_tokens - 1
    m = [[j <= i for j in range(L)] for i in range(L)]
    for s in range(class_tokens - 1, L, parallel):
        for i in range(s, min(s + parallel, L)):
            for j in range(s, min(s + parallel, L)):
                m[i][j] = True
    return torch.tensor(m)


@pytest.mark.parametrize("grid,parallel,C", [((4, 4), 1, 3), ((4, 4), 4, 3), ((4, 4), 16, 2), ((8, 8), 64, 4),
                                             ((8, 8), 16, 1), ((4, 8), 4, 5)])
def test_block_causal_mask_matches_brute_force(grid, parallel, C):
    model = make(grid_size=grid, parallel=parallel, class_tokens=C)
    expected = brute_force_mask(grid[0] * grid[1], C, parallel)
    assert model.attn_mask.dtype == torch.bool
    assert torch.equal(model.attn_mask, expected)


def test_mask_blocks_see_each_other_but_not_the_future():
    m = T.block_causal_mask(3 + 16 - 1, 3, 4)
    assert not m[0, 1] and m[1, 0]  # class tokens before C-1: plainly causal
    assert m[2, 5] and m[5, 2]  # block 0 = last class token + 3 queries, fully visible
    assert not m[5, 6] and m[6, 5]  # block 0 (2..5) cannot see block 1 (6..9); block 1 sees block 0
    assert m[6, 9] and m[9, 6] and not m[9, 10]


# -- token order and RoPE ---------------------------------------------------------------------


def test_patch_order_known_and_round_trip():
    perm = T.patch_order(4, 4, 4)
    assert perm.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert T.patch_order(4, 4, 1).tolist() == list(range(16))
    model = make(grid_size=(4, 8), parallel=16)
    x = torch.randn(2, 32, 5)
    assert torch.equal(model.to_raster_order(model.to_patch_order(x)), x)
    assert torch.equal(model.to_patch_order(model.to_raster_order(x)), x)
    # the first 16 tokens in patch order are the left 4x4 square of the 4x8 grid
    assert sorted(model.perm[:16].tolist()) == [r * 8 + c for r in range(4) for c in range(4)]


def test_rope_coordinates_and_frequencies():
    cfg = T.tiny(parallel=4)  # C=3, P=4, 4x4 grid, head_dim 16
    coords = T.sequence_coords(cfg)
    assert coords.shape == (cfg.seq_len, 2)
    assert torch.all(coords[: 3 + 3] == 0)  # class + query tokens at the origin
    # input token j (patch order) sits at (col + 1.5, row + 1.5): patch-order 2 is raster 4 = (row 1, col 0)
    assert coords[6].tolist() == [1.5, 1.5] and coords[8].tolist() == [1.5, 2.5]
    ang = T.rope_angles(torch.tensor([[2.5, 3.5]]), 16, 10000.0)[0]  # 4 freqs per axis
    f = [10000.0 ** (-2 * i / 8) for i in range(4)]
    assert torch.allclose(ang, torch.tensor([2.5 * v for v in f] + [3.5 * v for v in f]))


def test_rope_class_token_is_identity_and_image_tokens_rotate():
    model = make(parallel=4)
    n_prefix = model.config.class_tokens + 3
    x = torch.randn(2, model.config.seq_len, 2, model.config.head_dim)
    y = T.apply_rope(x, model.rope_cos, model.rope_sin)
    assert torch.equal(y[:, :n_prefix], x[:, :n_prefix])
    assert not torch.allclose(y[:, n_prefix:], x[:, n_prefix:])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotations keep norms
    # interleaved pairs: a unit vector in pair 0 rotates by angle x * f_0 within dims (0, 1)
    e = torch.zeros(1, 1, 1, 16)
    e[..., 0] = 1
    a = 0.7
    cos, sin = torch.full((1, 8), a).cos(), torch.full((1, 8), a).sin()
    r = T.apply_rope(e, cos, sin)[0, 0, 0]
    assert torch.allclose(r[:2], torch.tensor([math.cos(a), math.sin(a)]), atol=1e-6) and r[2:].abs().max() == 0


# -- teacher forcing vs incremental ------------------------------------------------------------


@pytest.mark.parametrize("grid,parallel", [((4, 4), 1), ((4, 4), 4), ((8, 8), 16), ((4, 8), 4), ((8, 4), 16)])
def test_teacher_forced_equals_cached_and_cache_free(grid, parallel):
    model = make(grid_size=grid, parallel=parallel).eval()
    cfg = model.config
    tokens = rand_tokens(3, cfg)
    labels = torch.tensor([0, 4, cfg.num_classes])  # includes the null class
    with torch.no_grad():
        ref = model.head_conditions(tokens, labels)  # (b, s, p, d)
        assert ref.shape == (3, cfg.num_steps, parallel, cfg.dim)
        patch = model.to_patch_order(tokens).view(3, cfg.num_steps, parallel, -1)
        model.setup_cache(3)
        cached = [model.prefill(labels)]
        for s in range(1, cfg.num_steps):
            cached.append(model.decode_step(patch[:, s - 1], s))
        model.clear_cache()
        free = [model.prefix_conditions(labels, patch[:, :s].flatten(1, 2)) for s in range(cfg.num_steps)]
    torch.testing.assert_close(torch.stack(cached, 1), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(free, 1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid,parallel,class_tokens", [((4, 4), 1, 3), ((4, 4), 4, 3), ((8, 8), 16, 1),
                                                        ((16, 16), 4, 64), ((8, 8), 64, 4)])
def test_decode_steps_need_no_mask(grid, parallel, class_tokens):
    """decode_step passes no mask (so SDPA may use its fast kernels): each step's rows of the block-causal mask
    must see every key up to the step's end."""
    model = make(grid_size=grid, parallel=parallel, class_tokens=class_tokens)
    for step in range(1, model.config.num_steps):
        start, end = model._step_span(step)
        assert end - start == parallel and bool(model.attn_mask[start:end, :end].all()), step


def test_a_bf16_cast_model_samples_and_keeps_fp32_rope():
    from bitdance.sampling import generate

    model = randomize_head(make(parallel=4)).eval()  # a zero-init head would ignore the backbone entirely
    rope = model.rope_cos.clone()
    model.to(torch.bfloat16)
    assert model.norm.weight.dtype == torch.bfloat16 and torch.equal(model.rope_cos, rope)  # tables not rounded
    labels = torch.tensor([0, 1])
    cached = generate(model, labels, generator=torch.Generator().manual_seed(0), progress=False)
    free = generate(model, labels, generator=torch.Generator().manual_seed(0), progress=False, use_cache=False)
    assert cached.shape == (2, 8, 4, 4) and torch.equal(cached, free)
    other = generate(model, torch.tensor([2, 3]), generator=torch.Generator().manual_seed(0), progress=False)
    assert not torch.equal(cached, other)  # the samples do depend on the backbone (the class)
    model.float()
    assert model.rope_cos.dtype == torch.float32 and model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("parallel", [1, 4])
def test_conditions_depend_only_on_earlier_patches(parallel):
    """Flipping a token of patch k changes the conditions of patches > k only; the class changes all of them."""
    model = make(parallel=parallel).eval()
    cfg = model.config
    tokens = rand_tokens(1, cfg)
    labels = torch.tensor([1])
    k = 1
    raster_idx = model.perm[k * parallel + parallel - 1].item()  # last token of patch k
    t2 = tokens.clone()
    t2[0, raster_idx] *= -1
    with torch.no_grad():
        a, b = model.head_conditions(tokens, labels), model.head_conditions(t2, labels)
        c = model.head_conditions(tokens, torch.tensor([2]))
    diff = (a - b).abs().amax(dim=(0, 2, 3))  # per AR step
    assert torch.all(diff[: k + 1] == 0) and torch.all(diff[k + 1 :] > 0)
    assert torch.all((a - c).abs().amax(dim=(0, 2, 3)) > 0)


# -- training forward -------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["diffusion", "bitwise"])
def test_training_forward_backward_and_clean_targets(monkeypatch, head):
    model = randomize_head(make(parallel=4, perturb_rate=1.0, class_dropout=0.5, head=head)).train()
    seen = {}
    loss_fn = model.head.loss

    def spy(cond, target, generator=None):
        seen["cond"], seen["target"] = cond, target
        return loss_fn(cond, target, generator=generator)

    monkeypatch.setattr(model.head, "loss", spy)
    tokens = rand_tokens(2, model.config)
    loss = model(tokens, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    loss.backward()
    cfg = model.config
    assert seen["cond"].shape == (2 * cfg.num_steps, 4, cfg.dim)
    # targets: clean tokens in patch order, one patch per row
    assert torch.equal(seen["target"], model.to_patch_order(tokens).reshape(2 * cfg.num_steps, 4, -1))
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    # the conditions saw corrupted inputs (every bit may flip, half the labels dropped), not the clean ones
    with torch.no_grad():
        clean = model.head_conditions(tokens, torch.tensor([0, 1])).reshape_as(seen["cond"])
        assert not torch.equal(seen["cond"], clean)
        model.config.perturb_rate, model.config.class_dropout = 0.0, 0.0
        model(tokens, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(seen["cond"], clean)  # no corruption: the training pass is the clean one


def test_perturb_rate_and_label_dropout_only_in_training():
    model = make(perturb_rate=0.5, class_dropout=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.ones(4, 1000, 32)
    flipped = (model.perturb(x, g) < 0).float().mean().item()
    assert abs(flipped - 0.25) < 0.01  # P(u1 < r u2) = r / 2
    labels = torch.tensor([0, 1, 2])
    assert model.train().drop_labels(labels, g).tolist() == [5, 5, 5]
    assert model.eval().drop_labels(labels, g).tolist() == [0, 1, 2]
    assert model.drop_labels(labels, force_drop=torch.tensor([0, 1, 0])).tolist() == [0, 5, 2]
    tokens = rand_tokens(2, model.config)
    with torch.no_grad():  # head_conditions never corrupts, in either mode
        model.train()
        c_train = model.head_conditions(tokens, labels[:2])
        model.eval()
        assert torch.equal(c_train, model.head_conditions(tokens, labels[:2]))
        model.train()  # the training loss, corruption included, is reproducible through the generator
        l1 = model(tokens, labels[:2], generator=torch.Generator().manual_seed(1))
        l2 = model(tokens, labels[:2], generator=torch.Generator().manual_seed(1))
        l3 = model(tokens, labels[:2], generator=torch.Generator().manual_seed(2))
    assert l1 == l2 and l1 != l3


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    a = randomize_head(make(parallel=4)).train()
    b = make(parallel=4, grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    tokens, labels = rand_tokens(2, a.config), torch.tensor([0, 3])
    la = a(tokens, labels, generator=torch.Generator().manual_seed(3))
    lb = b(tokens, labels, generator=torch.Generator().manual_seed(3))
    la.backward()
    lb.backward()
    assert b.head.net.gradient_checkpointing and not a.head.net.gradient_checkpointing  # the head's blocks too
    assert torch.allclose(la, lb)
    assert torch.allclose(a.layers[0].attention.wqkv.weight.grad, b.layers[0].attention.wqkv.weight.grad, atol=1e-6)
    assert torch.allclose(a.head.net.res_blocks[0].w1.weight.grad, b.head.net.res_blocks[0].w1.weight.grad,
                          atol=1e-6)


def test_config_errors():
    with pytest.raises(UserError):
        T.tiny(parallel=9)
    with pytest.raises(UserError):
        T.tiny(parallel=16, grid_size=(4, 6))
    with pytest.raises(UserError):
        T.tiny(bogus=1)
    with pytest.raises(UserError):
        make().head_conditions(torch.ones(1, 3, 8), torch.tensor([0]))
    with pytest.raises(UserError, match="cfg_scale"):  # saved sampling defaults that no sampler accepts
        T.tiny(cfg_scale=0.5)
    with pytest.raises(UserError, match="num_sampling_steps"):
        T.tiny(num_sampling_steps=0)
    with pytest.raises(UserError, match="cfg_scale"):  # NaN compares False both ways
        T.tiny(cfg_scale=float("nan"))
    # sizes and probabilities fail as one line, not deep inside a layer
    for bad, message in ((dict(n_heads=0), "n_heads=0"), (dict(parallel=-4), "parallel must be one of"),
                         (dict(head_attn_dim=0), "head_attn_dim=0"), (dict(num_classes=0), "num_classes=0"),
                         (dict(perturb_rate=1.5), "perturb_rate"), (dict(class_dropout=float("nan")), "class_dropout")):
        with pytest.raises(UserError, match=message):
            T.tiny(**bad)
    with pytest.raises(UserError, match="time_shift"):  # NaN would turn every sampled bit into -1
        BitDance(T.tiny(parallel=4, time_shift=float("nan")))
    model = make()
    with pytest.raises(UserError, match=r"class labels must be in 0\.\.4, got 5"):  # the null class: not a label
        model(rand_tokens(1, model.config), torch.tensor([model.config.num_classes]))
    with pytest.raises(UserError, match="got 7"):
        model.head_conditions(rand_tokens(1, model.config), torch.tensor([7]))
    # the bitwise head has no blocks: its depth and adaLN count are not checked
    assert BitDance(T.tiny(head="bitwise", head_depth=3, head_adaln=2)).config.head == "bitwise"


# -- official layout and parameter counts -------------------------------------------------------


def official_backbone_shapes(dim, n_layers, num_classes, C, k, n, P):
    """Names and shapes of an official ImageNet `ema` state dict (ref §6.2), minus vae.* and head.*."""
    ffh = ((8 * dim // 3) + 255) // 256 * 256
    hid = 3 * dim // 2
    s = {"cls_embedding.weight": (num_classes + 1, C * dim), "proj_in.w1.weight": (2 * hid, k),
         "proj_in.w1.bias": (2 * hid,), "proj_in.w2.weight": (dim, hid), "proj_in.w2.bias": (dim,),
         "emb_norm.weight": (dim,), "norm.weight": (dim,), "pos_for_diff.weight": (n, dim)}
    if P > 1:
        s["query_token"] = (1, P - 1, dim)
    for i in range(n_layers):
        s |= {f"layers.{i}.attention.wqkv.weight": (3 * dim, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
              f"layers.{i}.feed_forward.w1.weight": (2 * ffh, dim), f"layers.{i}.feed_forward.w2.weight": (dim, ffh),
              f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,)}
    return s


def official_head_shapes(D, depth, n_adaln, d, k, P):
    """`head.net.*` of the official DiffHead (ref §4.1, §6.2): MlpEncoder for 1x, TransEncoder for P > 1."""
    h = 3 * D // 2
    s = {"head.net.time_embed.mlp.0.weight": (D, 256), "head.net.time_embed.mlp.0.bias": (D,),
         "head.net.time_embed.mlp.2.weight": (D, D), "head.net.time_embed.mlp.2.bias": (D,),
         "head.net.cond_embed.weight": (D, d), "head.net.cond_embed.bias": (D,),
         "head.net.input_proj.weight": (D, k), "head.net.input_proj.bias": (D,),
         "head.net.final_layer.ada_ln_modulation.weight": (2 * D, D),
         "head.net.final_layer.ada_ln_modulation.bias": (2 * D,),
         "head.net.final_layer.linear.weight": (k, D), "head.net.final_layer.linear.bias": (k,)}
    n_mod = 3 if P == 1 else 6
    for a in range(n_adaln):
        s |= {f"head.net.ada_ln_blocks.{a}.weight": (n_mod * D, D), f"head.net.ada_ln_blocks.{a}.bias": (n_mod * D,)}
    for j in range(depth):
        r = f"head.net.res_blocks.{j}."
        s |= {r + "w1.weight": (2 * h, D), r + "w1.bias": (2 * h,), r + "w2.weight": (D, h), r + "w2.bias": (D,)}
        if P == 1:
            s |= {r + "norm.weight": (D,), r + "norm.bias": (D,)}
        else:
            s |= {r + "norm1.weight": (D,), r + "norm1.bias": (D,), r + "norm2.weight": (D,), r + "norm2.bias": (D,),
                  r + "attn.wqkv.weight": (3 * D, D), r + "attn.wqkv.bias": (3 * D,),
                  r + "attn.wo.weight": (D, D), r + "attn.wo.bias": (D,)}
    return s


def official_shapes(c):
    return official_backbone_shapes(c.dim, c.n_layers, c.num_classes, c.class_tokens, c.token_bits, c.num_tokens,
                                    c.parallel) | official_head_shapes(c.head_width, c.head_depth, c.head_adaln,
                                                                       c.dim, c.token_bits, c.parallel)


def backbone_shapes(model):
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if not n.startswith("head.")}


@pytest.mark.parametrize("name,parallel", [("B", 1), ("B", 16), ("L", 1), ("H", 1)])
def test_official_names_and_shapes_on_meta(name, parallel):
    with torch.device("meta"):
        model = BitDance(BITDANCE_PRESETS[name](parallel=parallel))
    c = model.config
    expected = official_backbone_shapes(c.dim, c.n_layers, 1000, 64, 32, 256, parallel)
    assert backbone_shapes(model) == expected
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == official_shapes(c)
    # non-persistent buffers stay out of the state dict
    assert not any(k in model.state_dict() for k in ("rope_cos", "rope_sin", "attn_mask", "perm"))


@pytest.mark.parametrize("name,millions", [("B", 220.3), ("L", 478.6), ("H", 897.7)])
def test_backbone_parameter_counts(name, millions):
    with torch.device("meta"):
        model = BitDance(BITDANCE_PRESETS[name](parallel=1))
    n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("head."))
    assert round(n / 1e6, 1) == millions  # ref §3.1, backbone only
    if name == "B":
        assert n == 220_267_008  # 242,373,152 total minus the 22,106,144-parameter 1x head
    with torch.device("meta"):
        b4 = BitDance(BITDANCE_PRESETS[name](parallel=4))
    assert sum(p.numel() for k, p in b4.named_parameters() if not k.startswith("head.")) == n + 3 * b4.config.dim


@pytest.mark.parametrize("name,parallel,total", [("B", 1, 242_373_152), ("B", 4, 260.1), ("B", 16, 260.1),
                                                  ("L", 1, 527.3), ("H", 1, 1008.0)])
def test_total_parameter_counts(name, parallel, total):
    with torch.device("meta"):
        model = BitDance(BITDANCE_PRESETS[name](parallel=parallel))
    n = sum(p.numel() for p in model.parameters())
    assert n == total if isinstance(total, int) else round(n / 1e6, 1) == total  # ref §3.1 (VAE excluded)


@pytest.mark.parametrize("parallel", [1, 4])
def test_random_official_state_dict_loads_strict(parallel):
    model = make(parallel=parallel)
    c = model.config
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in official_shapes(c).items()}
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.cls_embedding.weight, sd["cls_embedding.weight"])
    assert torch.equal(model.head.net.final_layer.linear.weight, sd["head.net.final_layer.linear.weight"])


def test_init_and_class_token_split():
    model = make(preset="fmnist")
    w = model.layers[0].feed_forward.w1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and model.proj_in.w1.bias.abs().max() == 0
    # class token t is row-major slice t of the C*d embedding row
    emb = model.cls_embedding.weight[3]
    prefix = model._prefix(torch.tensor([3]))[0]
    d = model.config.dim
    assert torch.equal(prefix[1], emb[d : 2 * d])


def test_bf16_autocast_cached_matches_teacher_forced():
    """Under autocast every path keeps an fp32 residual stream, so bf16 rounding alone separates them."""
    from bitdance.utils import autocast

    model = make(parallel=4).eval()
    tokens, labels = rand_tokens(2, model.config), torch.tensor([0, 1])
    patch = model.to_patch_order(tokens)
    with torch.no_grad(), autocast(torch.device("cpu"), "bfloat16"):
        ref = model.head_conditions(tokens, labels)
        model.setup_cache(2, dtype=torch.bfloat16)
        got = [model.prefill(labels)] + [model.decode_step(patch[:, 4 * (s - 1) : 4 * s], s) for s in (1, 2, 3)]
        model.clear_cache()
    assert ref.dtype == torch.float32
    torch.testing.assert_close(torch.stack(got, 1).float(), ref, atol=1e-3, rtol=0)
