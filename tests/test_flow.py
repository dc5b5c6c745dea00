"""RectifiedFlow: time sampling, interpolant/velocity loss, the official Euler-Maruyama grid and sampler."""

import pytest
import torch

from bitdance.flow import FlowConfig, RectifiedFlow, time_shift_sana, to_bits
from bitdance.utils import UserError


def toy_net(scale: float = 0.7):
    """A fixed nonlinear x-predictor depending on z and t, recording the t it is evaluated at."""
    calls = []

    def fn(z, t):
        calls.append(t.clone())
        return torch.tanh(scale * z + t.view(-1, *([1] * (z.ndim - 1))))

    return fn, calls


def reference_sampler(net, noise, n, cfg, gen, shift=1.0, temperature=1.0):
    """The official loop written out literally (ref §4.3, §8), for comparison; temperature scales its noise."""
    x = noise.clone()
    grid = torch.linspace(0, 0.95, n + 1, dtype=torch.float32)
    grid = (1 / shift) / ((1 / shift) + (1 / grid - 1))  # the official code shifts even when shift == 1
    dts = grid[1:] - grid[:-1]
    t = torch.tensor(0.0)
    mult = 1 if cfg is None else 2
    for i in range(n):
        tb = torch.full((x.shape[0] * mult,), float(t))
        xin = torch.cat([x] * mult)
        v = (net(xin, tb) - xin) / (1 - tb.view(-1, *([1] * (x.ndim - 1)))).clamp_min(0.05)
        if cfg is not None:
            vc, vu = v.chunk(2)
            v = vu + cfg * (vc - vu)
        score = (t * v - x) / ((1 - t) ** 2 + t * (1 - t))
        noise = (2.0 * (1.0 - t) * dts[i]) ** 0.5 * torch.randn(x.shape, generator=gen)
        x = x + (v + (1 - t) * score) * dts[i] + (noise if temperature == 1.0 else temperature * noise)
        t += dts[i]
    tb = torch.full((x.shape[0] * mult,), 0.95)
    xin = torch.cat([x] * mult)
    v = (net(xin, tb) - xin) / (1 - tb.view(-1, *([1] * (x.ndim - 1)))).clamp_min(0.05)
    if cfg is not None:
        vc, vu = v.chunk(2)
        v = vu + cfg * (vc - vu)
    return x + v * 0.05


@pytest.mark.parametrize("n", [1, 7, 100])
def test_time_grid_reaches_095_then_one_final_step(n):
    flow = RectifiedFlow()
    ts, dts = flow.timestep_grid(n)
    assert ts.dtype == torch.float32 and ts.shape == (n + 1,) and dts.shape == (n + 1,)
    assert ts[0] == 0.0
    assert torch.allclose(dts[:n], torch.full((n,), 0.95 / n), atol=1e-6)
    assert abs(float(ts[n - 1] + dts[n - 1]) - 0.95) < 1e-5  # the stochastic steps end at 0.95
    assert ts[n] == torch.tensor(0.95) and dts[n] == torch.tensor(0.05)  # then one Euler step of 0.05
    # t is the fp32 running sum of the dt's (the official `t += dt`), not the linspace value
    t = torch.tensor(0.0)
    for i in range(n):
        assert ts[i] == t
        t += dts[i]


def test_time_grid_with_shift_keeps_official_final_step():
    flow = RectifiedFlow(FlowConfig(time_shift=3.0))
    ts, dts = flow.timestep_grid(10)
    plain, _ = RectifiedFlow().timestep_grid(10)
    assert (ts[1:10] < plain[1:10]).all()  # s > 1 spends more steps near the noise end
    assert ts[10] == torch.tensor(0.95) and dts[10] == torch.tensor(0.05)


def test_time_shift_values():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(time_shift_sana(t, 3.0), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(time_shift_sana(t, 1.0), t)


@pytest.mark.parametrize("n", [6, 25, 50, 100])
def test_time_grid_is_the_official_grid_bit_for_bit(n):
    """linspace(0, 0.95), shifted (also at s = 1, which moves some points by an ulp), t accumulated in fp32."""
    grid = torch.linspace(0, 0.95, n + 1, dtype=torch.float32)
    grid = 1.0 / (1.0 + (1 / grid - 1))
    dts = grid[1:] - grid[:-1]
    ts, t = [], torch.tensor(0.0)
    for i in range(n):
        ts.append(t.clone())
        t += dts[i]
    timesteps, sizes = RectifiedFlow().timestep_grid(n)
    assert torch.equal(timesteps[:-1], torch.stack(ts)) and torch.equal(sizes[:-1], dts)


def test_velocity_clamp_near_one():
    flow = RectifiedFlow()
    z = torch.zeros(3, 2)
    xh = torch.ones(3, 2)
    v = flow.velocity(xh, z, torch.tensor([0.5, 0.99, 1.0]))
    assert torch.allclose(v[:, 0], torch.tensor([2.0, 20.0, 20.0]))  # 1 / max(1 - t, 0.05)


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    t = RectifiedFlow().sample_t(20000, generator=g)
    assert 0 < t.min() and t.max() < 1
    median = torch.sigmoid(torch.tensor(-0.8)).item()  # logit-normal median, 0.31
    assert abs(t.median().item() - median) < 0.01
    u = RectifiedFlow(FlowConfig(time_schedule="uniform")).sample_t(20000, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.median().item() - 0.5) < 0.02
    with pytest.raises(UserError):
        RectifiedFlow(FlowConfig(time_schedule="cosine"))


def test_loss_matches_hand_computation():
    flow = RectifiedFlow()
    x = torch.randn(6, 4, 8).sign()
    net, _ = toy_net()
    loss = flow.loss(net, x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # same draws, same order: t first, then eps
    t = (torch.randn(6, generator=g) * 0.8 - 0.8).sigmoid()
    eps = torch.randn(x.shape, generator=g)
    ti = t.view(-1, 1, 1)
    z = (1 - ti) * eps + ti * x
    den = (1 - ti).clamp_min(0.05)
    expected = (((x - z) / den - (net(z, t) - z) / den) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert flow.loss(lambda z, t: x, x, torch.Generator().manual_seed(3)) == 0  # a perfect predictor
    per_row = flow.loss(net, x, torch.Generator().manual_seed(3), reduction="none")
    assert per_row.shape == (6, 4) and torch.allclose(per_row.mean(), loss)


def test_under_bf16_autocast_the_net_runs_bf16_and_the_flow_fp32():
    """As the official head: the network inside the caller's autocast, t / noise / loss / updates in fp32."""
    lin = torch.nn.Linear(8, 8)
    seen = []

    def net(z, t):
        seen.append((z.dtype, t.dtype))
        out = lin(z)
        seen.append(out.dtype)
        return out

    x = torch.randn(5, 8).sign()
    ref = RectifiedFlow().loss(net, x, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = RectifiedFlow().loss(net, x, torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32 and seen[-1] == torch.bfloat16 and seen[-2] == (torch.float32, torch.float32)
    assert torch.allclose(got, ref, rtol=0.05) and not torch.equal(got, ref)  # same draws, bf16 matmul rounding

    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bits = RectifiedFlow().sample(net, shape=(3, 8), num_steps=4, cfg_scale=2.0,
                                      generator=torch.Generator().manual_seed(1), binarize=False)
    assert bits.dtype == torch.float32 and set(seen[1::2]) == {torch.bfloat16}
    assert set(seen[0::2]) == {(torch.float32, torch.float32)}  # the state x and t stay fp32 between net calls


@pytest.mark.parametrize("cfg", [None, 2.5])
def test_sampler_matches_official_loop(cfg):
    flow = RectifiedFlow()
    noise = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    net, calls = toy_net()
    got = flow.sample(net, noise=noise, num_steps=12, cfg_scale=cfg,
                      generator=torch.Generator().manual_seed(2), binarize=False)
    ref = reference_sampler(toy_net()[0], noise, 12, cfg, torch.Generator().manual_seed(2))
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    # 12 stochastic evaluations on the grid plus the final one at 0.95, each on b (or 2b with CFG) rows
    assert len(calls) == 13 and all(c.shape == (3 if cfg is None else 6,) for c in calls)
    assert calls[0].eq(0).all() and calls[-1].eq(torch.tensor(0.95)).all()


def test_sampler_with_shift_matches_official_loop():
    flow = RectifiedFlow(FlowConfig(time_shift=2.0))
    noise = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    got = flow.sample(toy_net()[0], noise=noise, num_steps=6, generator=torch.Generator().manual_seed(4),
                      binarize=False)
    ref = reference_sampler(toy_net()[0], noise, 6, None, torch.Generator().manual_seed(4), shift=2.0)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)


def test_scheduler_face_matches_sample():
    flow = RectifiedFlow()
    net, _ = toy_net()
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    want = flow.sample(net, noise=noise, num_steps=5, generator=torch.Generator().manual_seed(6),
                       binarize=False)
    flow.set_timesteps(5)
    assert flow.timesteps.shape == (6,)
    g = torch.Generator().manual_seed(6)
    x = noise.clone()
    for i, t in enumerate(flow.timesteps):
        tb = t.expand(x.shape[0])
        x = flow.step(flow.velocity(net(x, tb), x, tb), i, x, generator=g)
    assert torch.allclose(x, want, atol=1e-7, rtol=0)


def test_temperature_scales_the_step_noise_only():
    flow = RectifiedFlow()
    noise = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))

    def draw(temperature, seed=2, **kw):
        return flow.sample(toy_net()[0], noise=noise, num_steps=6, cfg_scale=2.0, binarize=False,
                           generator=torch.Generator().manual_seed(seed), temperature=temperature, **kw)

    # 1 is the official sampler bit for bit (the written-out loop has no temperature factor there); others scale
    # the Euler-Maruyama noise as the loop does
    official = reference_sampler(toy_net()[0], noise, 6, 2.0, torch.Generator().manual_seed(2))
    default = flow.sample(toy_net()[0], noise=noise, num_steps=6, cfg_scale=2.0, binarize=False,
                          generator=torch.Generator().manual_seed(2))  # no temperature given
    assert torch.equal(draw(1.0), official) and torch.equal(default, official)
    assert torch.equal(draw(None), official)  # the flow has no model default: None is the official 1
    ref = reference_sampler(toy_net()[0], noise, 6, 2.0, torch.Generator().manual_seed(2), temperature=0.5)
    assert torch.allclose(draw(0.5), ref, atol=1e-6, rtol=0)
    # at 0 only the start noise is random: the generator's later draws change nothing
    assert torch.equal(draw(0.0, seed=2), draw(0.0, seed=3)) and not torch.equal(draw(1.0, 2), draw(1.0, 3))
    # the scheduler face takes it per step
    flow.set_timesteps(6)
    x, g = noise.clone(), torch.Generator().manual_seed(2)
    for i, t in enumerate(flow.timesteps):
        tb = t.expand(2 * x.shape[0])
        xin = torch.cat([x, x])
        v = flow.guide(flow.velocity(toy_net()[0](xin, tb), xin, tb), 2.0)
        x = flow.step(v, i, x, generator=g, temperature=0.5)
    assert torch.allclose(x, ref, atol=1e-6, rtol=0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="temperature"):
            draw(bad)


def test_samples_are_bits_and_deterministic():
    flow = RectifiedFlow()

    def net(z, t):  # an unbiased predictor: the sign comes from the noise
        return torch.tanh(2 * z)

    def draw(seed):
        return flow.sample(net, shape=(4, 2, 8), num_steps=5, cfg_scale=3.0,
                           generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (4, 2, 8) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.2 < (a > 0).float().mean() < 0.8


def test_to_bits_maps_zero_to_minus_one():
    x = torch.tensor([0.0, -0.0, 1e-30, -2.0, 3.0])
    assert to_bits(x).tolist() == [-1.0, -1.0, 1.0, -1.0, 1.0]


def test_bad_step_count_is_a_user_error():
    with pytest.raises(UserError):
        RectifiedFlow().sample(toy_net()[0], shape=(1, 4), num_steps=0)
