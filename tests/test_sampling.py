"""sampling.generate: cached vs cache-free, CFG branch handling, order of outputs, reproducibility, save/load."""

import warnings

import numpy as np
import pytest
import torch
from test_transformer import randomize_head  # the head's zeroed output layers, randomised

from bitdance.models import transformer as T
from bitdance.models.transformer import BITDANCE_PRESETS, BitDance
from bitdance.sampling import cfg_scale_at, generate
from bitdance.utils import UserError


def make(parallel=1, seed=0, **kw):
    """Tiny model; the head's zero-initialised output layers are randomised so that samples depend on the
    condition (otherwise cached vs cache-free equality would hold trivially)."""
    torch.manual_seed(seed)
    return randomize_head(BitDance(BITDANCE_PRESETS["tiny"](parallel=parallel, **kw)).eval(), seed)


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Spy:
    """Wraps head.sample and decode_step to record (rows in, scale, output) and what each step fed back."""

    def __init__(self, model, monkeypatch):
        self.calls, self.fed = [], []
        sample, decode = model.head.sample, model.decode_step

        def spy_sample(cond, num_steps, cfg_scale, generator, **kw):
            out = sample(cond, num_steps, cfg_scale, generator, **kw)
            self.calls.append((cond.shape[0], cfg_scale, out))
            return out

        def spy_decode(new_tokens, step):
            self.fed.append(new_tokens)
            return decode(new_tokens, step)

        monkeypatch.setattr(model.head, "sample", spy_sample)
        monkeypatch.setattr(model, "decode_step", spy_decode)


@pytest.mark.parametrize("grid,parallel,schedule,head", [((4, 4), 1, "linear", "diffusion"),
                                                         ((8, 8), 16, "linear", "diffusion"),
                                                         ((4, 4), 4, "constant", "bitwise")])
def test_cached_equals_cache_free(grid, parallel, schedule, head):
    model = make(parallel=parallel, grid_size=grid, head=head)
    labels = torch.tensor([0, 3, 4])
    a = generate(model, labels, cfg_scale=3.0, cfg_schedule=schedule, generator=gen(7), progress=False)
    b = generate(model, labels, cfg_scale=3.0, cfg_schedule=schedule, generator=gen(7), use_cache=False,
                 progress=False)
    assert a.shape == (3, 8, *grid)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    # the samples really depend on the class: another label set gives other codes from the same generator
    c = generate(model, torch.tensor([1, 2, 0]), cfg_scale=3.0, cfg_schedule=schedule, generator=gen(7),
                 progress=False)
    assert not torch.equal(a, c)
    assert all(layer.attention.k_cache is None for layer in model.layers)  # cache released


def test_reproducible_and_seed_dependent():
    model = make(parallel=4)
    labels = torch.tensor([1, 2])
    a = generate(model, labels, generator=gen(0), progress=False)
    b = generate(model, labels, generator=gen(0), progress=False)
    c = generate(model, labels, generator=gen(1), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_linear_cfg_step0_unguided_then_guided(monkeypatch):
    model = make(parallel=4)  # 4 AR steps
    spy = Spy(model, monkeypatch)
    b, s = 2, 3.0
    generate(model, torch.tensor([0, 1]), cfg_scale=s, cfg_schedule="linear", generator=gen(0), progress=False)
    S = model.config.num_steps
    assert [(n, sc) for n, sc, _ in spy.calls] == [(2 * b, None)] + [(2 * b, 1 + (s - 1) * i / S) for i in range(1, S)]
    # step 0: each branch is fed its own (unguided) sample; later: the guided sample goes to both branches
    assert spy.calls[0][2].shape[0] == 2 * b and torch.equal(spy.fed[0], spy.calls[0][2])
    for i in range(1, S - 1):
        x = spy.calls[i][2]
        assert x.shape[0] == b and torch.equal(spy.fed[i], torch.cat([x, x]))


def test_cfg_off_skips_null_branch_and_constant_schedule(monkeypatch):
    model = make()
    spy = Spy(model, monkeypatch)
    generate(model, torch.tensor([0, 1]), cfg_scale=1.0, cfg_schedule="constant", generator=gen(0), progress=False)
    assert {(n, sc) for n, sc, _ in spy.calls} == {(2, None)}
    spy.calls.clear()
    generate(model, torch.tensor([0, 1]), cfg_scale=2.5, cfg_schedule="constant", generator=gen(0), progress=False)
    assert {(n, sc) for n, sc, _ in spy.calls} == {(4, 2.5)}
    assert cfg_scale_at(0, 16, 4.0, "linear") == 1.0 and cfg_scale_at(8, 16, 4.0, "linear") == 2.5


def test_output_is_raster_order_of_sampled_patches(monkeypatch):
    model = make(parallel=4)
    spy = Spy(model, monkeypatch)
    codes = generate(model, torch.tensor([2]), cfg_scale=1.0, generator=gen(3), progress=False)  # (1, k, h, w)
    patch = torch.cat([out[:1] for _, _, out in spy.calls], dim=1)[0]  # (n, k) in patch order
    k, h, w = codes.shape[1:]
    for j, r in enumerate(T.patch_order(h, w, 4).tolist()):
        assert torch.equal(codes[0, :, r // w, r % w], patch[j])


@pytest.mark.parametrize("head", ["diffusion", "bitwise"])
def test_save_load_round_trip_same_samples(tmp_path, head):
    model = make(parallel=4, head=head)
    model.save_pretrained(tmp_path / "gen")
    loaded = BitDance.from_pretrained(tmp_path / "gen")
    assert loaded.config == model.config
    labels = torch.tensor([0, 4])
    a = generate(model, labels, generator=gen(5), progress=False)
    b = generate(loaded, labels, generator=gen(5), progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("head", ["diffusion", "bitwise"])
def test_temperature_overrides_the_models_default(head):
    labels = torch.tensor([0, 3, 4])

    def draw(model, **kw):
        return generate(model, labels, cfg_scale=2.0, generator=gen(3), progress=False, **kw)

    model, cold = make(parallel=4, head=head), make(parallel=4, head=head, head_temperature=0.0)  # same weights
    assert torch.equal(draw(model), draw(model, temperature=1.0))  # the model's default is 1
    assert torch.equal(draw(cold), draw(model, temperature=0.0))  # a call's temperature overrides the config's
    assert not torch.equal(draw(model), draw(cold))
    with pytest.raises(UserError, match="temperature"):
        draw(model, temperature=-1.0)
    with pytest.raises(UserError, match="temperature"):  # a saved default is checked when the model is built
        make(head=head, head_temperature=float("nan"))


def test_model_defaults_and_user_errors():
    model = make(cfg_scale=1.0, cfg_schedule="constant", num_sampling_steps=2)
    out = generate(model, [0, 1, 2], generator=gen(0), progress=False)  # a plain list works too
    assert out.shape == (3, 8, 4, 4)
    with pytest.raises(UserError):
        generate(model, torch.tensor([5]), progress=False)  # 5 is the null class, not a valid label
    with pytest.raises(UserError):
        generate(model, torch.tensor([0]), cfg_scale=0.5, progress=False)
    with pytest.raises(UserError, match="cfg scale"):
        generate(model, torch.tensor([0]), cfg_scale=float("nan"), progress=False)  # not silently unguided
    with pytest.raises(UserError, match="cfg scale"):
        generate(model, torch.tensor([0]), cfg_scale=float("inf"), progress=False)  # not silently all -1 bits
    with pytest.raises(UserError, match="cfg_scale"):
        make(cfg_scale=float("inf"))  # nor saved as a model's default
    for steps in (2.7, True, float("nan"), float("inf")):  # not silently 2 (or 1) head steps, nor a bare error
        with pytest.raises(UserError, match="whole number"):
            generate(model, torch.tensor([0]), num_steps=steps, progress=False)
    assert torch.equal(generate(model, [0], num_steps=2.0, generator=gen(0), progress=False),
                       generate(model, [0], num_steps=2, generator=gen(0), progress=False))
    for labels in (torch.tensor([1.9]), [0.5], torch.tensor([True]), torch.tensor([[0, 1]])):
        with pytest.raises(UserError, match="integers, one per image"):  # 1.9 is not class 1
            generate(model, labels, progress=False)
    with pytest.raises(UserError, match="no class labels"):
        generate(model, [], progress=False)
    assert generate(model, np.array([2], dtype=np.int32), generator=gen(0), progress=False).shape == (1, 8, 4, 4)
    with pytest.raises(UserError):
        generate(model, torch.tensor([0]), cfg_schedule="cosine", progress=False)
    with pytest.raises(UserError, match="class dropout"):  # its null class was never trained
        generate(make(class_dropout=0.0), [0], cfg_scale=2.0, progress=False)
    model.train()
    generate(model, [0], generator=gen(0), progress=False)
    assert model.training  # training mode restored after sampling


def test_a_cpu_generator_drives_a_model_on_another_device():
    """Noise is drawn where the generator lives, then moved (diffusers' convention): the same seed gives the same
    numbers whatever the model's device. Shown with the meta device, which needs no GPU."""
    from bitdance.utils import random_on

    x = random_on("normal", (2, 3), gen(0), "meta")
    assert x.device.type == "meta" and x.shape == (2, 3)
    assert torch.equal(random_on("uniform", (4,), gen(1), "cpu"), torch.rand(4, generator=gen(1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_a_cuda_model_samples_like_the_cpu():
    model = make(parallel=4)
    cpu = generate(model, [0, 1], generator=gen(3), progress=False)
    cuda = generate(model.cuda(), [0, 1], generator=gen(3), progress=False)
    assert (cuda.cpu() == cpu).float().mean() > 0.99  # the same noise; kernels may round differently


def test_linear_guidance_over_one_ar_step_warns_that_it_does_nothing():
    model = make(parallel=16, cfg_scale=3.0, cfg_schedule="linear", num_sampling_steps=2)  # 4x4 grid: one AR step
    with pytest.warns(UserWarning, match="does nothing"):
        generate(model, [0, 1], generator=gen(0), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the constant schedule guides: no warning
        generate(model, [0, 1], cfg_schedule="constant", generator=gen(0), progress=False)


# -- autoguidance: a weaker generator of the same tokens guides instead of the null class --------------


@pytest.mark.parametrize("head", ["diffusion", "bitwise"])
def test_a_model_guiding_itself_samples_as_unguided(head):
    # v_guide + w (v - v_guide) with v_guide == v is v exactly, and the guided path draws the same noise
    model = make(parallel=4, head=head)
    labels = torch.tensor([0, 2, 4])
    unguided = generate(model, labels, cfg_scale=1.0, generator=gen(3), progress=False)
    self_guided = generate(model, labels, cfg_scale=3.0, cfg_schedule="constant", generator=gen(3), progress=False,
                           guide_model=model)
    assert torch.equal(unguided, self_guided)


@pytest.mark.parametrize("head", ["diffusion", "bitwise"])
def test_guide_model_changes_samples_and_cached_equals_cache_free(head):
    model, guide = make(parallel=4, head=head), make(parallel=4, seed=1, head=head, dim=32, n_layers=1)
    labels = torch.tensor([1, 3])
    kw = dict(cfg_scale=2.5, cfg_schedule="linear", progress=False, guide_model=guide)
    a = generate(model, labels, generator=gen(4), **kw)
    b = generate(model, labels, generator=gen(4), use_cache=False, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, labels, cfg_scale=1.0, generator=gen(4), progress=False))
    assert not torch.equal(a, generate(model, labels, cfg_scale=2.5, generator=gen(4), progress=False))  # not CFG
    assert all(layer.attention.k_cache is None for net in (model, guide) for layer in net.layers)


def test_guide_model_runs_beside_the_model_not_on_the_null_class(monkeypatch):
    model, guide = make(parallel=4), make(parallel=4, seed=1)
    spy = Spy(model, monkeypatch)
    prefilled = []
    monkeypatch.setattr(guide, "prefill", lambda ids: prefilled.append(ids) or T.BitDance.prefill(guide, ids))
    labels = torch.tensor([0, 1, 2])
    generate(model, labels, cfg_scale=2.0, cfg_schedule="linear", generator=gen(0), progress=False, guide_model=guide)
    assert torch.equal(prefilled[0], labels)  # the guide sees the class, not the null class
    assert [rows for rows, _, _ in spy.calls] == [3] * model.config.num_steps  # no doubled batch
    assert spy.calls[0][1] is None and all(scale > 1 for _, scale, _ in spy.calls[1:])  # linear: step 0 unguided
    assert all(fed.shape[0] == 3 for fed in spy.fed)


def test_guide_model_needs_no_null_class_but_the_same_tokens():
    model = make(parallel=4, class_dropout=0.0)
    with pytest.raises(UserError, match="class dropout"):
        generate(model, torch.tensor([0]), cfg_scale=2.0, progress=False)
    out = generate(model, torch.tensor([0]), cfg_scale=2.0, progress=False, guide_model=make(parallel=4, seed=1))
    assert out.shape == (1, 8, 4, 4)
    others = ((make(parallel=1), "parallel"), (make(parallel=4, head="bitwise"), "head"),
              (make(parallel=4, token_bits=16), "token_bits"), (make(parallel=4, num_classes=3), "num_classes"))
    for other, field in others:
        with pytest.raises(UserError, match=f"guide model does not match the model: {field}"):
            generate(model, torch.tensor([0]), cfg_scale=2.0, progress=False, guide_model=other)


@pytest.mark.parametrize("head", ["diffusion", "bitwise"])
def test_head_sample_refuses_guidance_inputs_it_cannot_mix(head):
    model = make(parallel=4, head=head)
    cond = torch.randn(3, 4, model.head.config.cond_dim)  # 3 rows: not a [cond; uncond] stack
    with pytest.raises(ValueError, match="even rows"):
        model.head.sample(cond, 2, 2.0)
    with pytest.raises(ValueError, match="a guide head needs a cfg_scale"):
        model.head.sample(cond, 2, None, guide=(model.head, cond))
    with pytest.raises(ValueError, match="cond must be"):  # the guide's condition is checked against its own head
        model.head.sample(cond, 2, 2.0, guide=(model.head, cond[..., :-1]))
    assert model.head.sample(cond, 2, 2.0, guide=(model.head, cond)).shape == (3, 4, model.config.token_bits)
