"""Rectified flow for the binary diffusion head: time sampling, interpolant, velocity loss, sampler.

Holds no weights (ref §4.2-§4.3). The head passes its network in as `net_fn(z, t) -> x_hat`: the
network predicts the clean bits x (x-prediction) and everything here converts that to a velocity.

Conventions (ref §4.2): t = 1 is data, t = 0 is noise, z_t = (1 - t) eps + t x.
Velocity from an x-prediction: v = (x_hat - z) / max(1 - t, 0.05); the clamp keeps v bounded near t = 1.

Sampler (ref §4.3, §8): Euler-Maruyama on an fp32 grid from t = 0 to 0.95 in N steps, equal when time_shift = 1
(t accumulated with `t += dt` in fp32, as the official loop does; a shift makes them unequal, see timestep_grid),
then one deterministic Euler step of 0.05, then sign.
An optional temperature scales the per-step noise of the Euler-Maruyama updates (as MAR's diffusion head does):
1 is the official sampler, below 1 draws closer to the modes, 0 leaves only the drift.
Precision as in the official head: the network runs under the caller's autocast (bf16 on a GPU with
--dtype bfloat16), while t, the noise, the interpolant, the loss and every sampler update are fp32 (the flow's
own arithmetic is element-wise on fp32 tensors, which autocast leaves alone). All noise comes from the caller's
generator.

Letters: b batch, p tokens per patch, k bits per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from bitdance.utils import UserError, fp32_island, random_on

NetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z (n, ..., k), t (n,)) -> x_hat (n, ..., k)

TIME_SCHEDULES = ("logit_normal", "uniform")


@dataclass
class FlowConfig:
    time_schedule: str = "logit_normal"  # training t: "logit_normal" (sigmoid of a normal) or "uniform"
    P_mean: float = -0.8  # logit-normal mean (ref §4.2: median t ~ 0.31, biased to the noise end)
    P_std: float = 0.8
    time_shift: float = 1.0  # SANA shift s; 1 = off (all released models)
    last_step_size: float = 0.05  # the sampler's final deterministic Euler step
    min_one_minus_t: float = 0.05  # velocity clamp: v = (x - z) / max(1 - t, this)


def time_shift_sana(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = (1/s) / ((1/s) + (1/t - 1)); s > 1 moves t toward the noise end. t = 0 stays 0 (1/0 = inf).

    Always evaluated, also for s = 1 where it is the identity up to the last bit of fp32: the official sampler
    shifts its grid unconditionally, so ours does too and the grids agree bit for bit.
    """
    inv = 1.0 / shift
    return inv / (inv + (1.0 / t - 1.0))


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, 1, ..., 1) with like.ndim dims, so one t covers a whole row (token or patch)."""
    return t.view(t.shape[0], *([1] * (like.ndim - 1)))


class RectifiedFlow:
    """Weight-free flow schedule; a diffusers-like scheduler face (`set_timesteps`, `timesteps`, `step`).

    Main entries: `loss(net_fn, x, generator)` for training and
    `sample(net_fn, shape | noise, num_steps, cfg_scale, generator)` for inference.
    """

    def __init__(self, config: FlowConfig | None = None):
        self.config = config or FlowConfig()
        if self.config.time_schedule not in TIME_SCHEDULES:
            raise UserError(
                f"unknown time_schedule {self.config.time_schedule!r}; choose one of {TIME_SCHEDULES}"
            )
        c = self.config
        if not all(math.isfinite(v) for v in (c.P_mean, c.P_std, c.time_shift)) or c.time_shift <= 0:
            # NaN would pass a comparison and turn every sample into -1 bits, every loss into NaN
            raise UserError(f"P_mean, P_std must be finite and time_shift finite and > 0, got {c.P_mean}, {c.P_std}, "
                            f"{c.time_shift}")
        self.timesteps: torch.Tensor | None = None  # set by set_timesteps: (N + 1,) evaluation times
        self.step_sizes: torch.Tensor | None = None  # (N + 1,) dt of each step (the last one is 0.05)
        self.num_inference_steps: int | None = None
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # N -> CPU grid

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        """(n,) training times in (0, 1): logit-normal or uniform, then the optional shift."""
        c = self.config
        if c.time_schedule == "logit_normal":
            t = (random_on("normal", (n,), generator, device) * c.P_std + c.P_mean).sigmoid()
        else:
            t = random_on("uniform", (n,), generator, device)
        return t if c.time_shift == 1.0 else time_shift_sana(t, c.time_shift)  # official: shifted only if s != 1

    @staticmethod
    def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = (1 - t) eps + t x, with t (n,) broadcast over each row."""
        ti = _bcast(t, x)
        return (1.0 - ti) * eps + ti * x

    def velocity(self, x_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = (x_hat - z) / max(1 - t, 0.05); t is (n,) or a scalar tensor."""
        ti = _bcast(t, z) if t.ndim == 1 else t
        return (x_hat - z) / (1.0 - ti).clamp_min(self.config.min_one_minus_t)

    def loss(
        self,
        net_fn: NetFn,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Velocity MSE for data x (n, ..., k); one t per row n, shared by the row's tokens.

        reduction "mean": scalar; "none": mean over the last (bit) axis only, shape x.shape[:-1].
        """
        x = x.float()
        with torch.no_grad(), fp32_island(x.device.type):
            t = self.sample_t(x.shape[0], x.device, generator)  # (n,)
            eps = random_on("normal", x.shape, generator, x.device)
            z = self.interpolate(x, eps, t)  # (n, ..., k)
            v = self.velocity(x, z, t)
        v_hat = self.velocity(net_fn(z, t).float(), z, t)  # the net under the caller's autocast, v_hat in fp32
        err = (v - v_hat) ** 2
        if reduction == "mean":
            return err.mean()
        if reduction == "none":
            return err.mean(dim=-1)
        raise ValueError(f"unknown reduction {reduction!r}")

    # ------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------

    def timestep_grid(
        self, num_steps: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (N + 1,), step_sizes (N + 1,)) in fp32, the official grid.

        Steps 0..N-1 are stochastic: dt_i from linspace(0, 0.95, N + 1) (after the shift), and t_i is the
        fp32 running sum `t += dt` (not the linspace value: the two differ in the last bits). Step N is the
        deterministic Euler step at t = 0.95 with dt = 0.05. With time_shift != 1 the official code still
        evaluates that final step at t = 1 - 0.05 with dt = 0.05 although the shifted grid ends elsewhere;
        we keep the quirk so official checkpoints sample identically (released models use shift 1).
        Built once per N on the CPU (a few hundred scalar ops; fp32 arithmetic is the same on any device).
        """
        if int(num_steps) != num_steps or num_steps < 1:
            raise UserError(f"the number of head sampling steps must be a positive integer, got {num_steps}")
        num_steps = int(num_steps)
        if num_steps not in self._grids:
            last = self.config.last_step_size
            grid = torch.linspace(0.0, 1.0 - last, num_steps + 1, dtype=torch.float32)
            grid = time_shift_sana(grid, self.config.time_shift)
            dts = grid[1:] - grid[:-1]  # (N,)
            ts = torch.empty(num_steps + 1, dtype=torch.float32)
            t = torch.zeros((), dtype=torch.float32)
            for i in range(num_steps):
                ts[i] = t
                t += dts[i]  # fp32 accumulation, exactly as the official loop
            ts[num_steps] = 1.0 - last
            sizes = torch.cat([dts, torch.full((1,), last, dtype=torch.float32)])
            self._grids[num_steps] = (ts, sizes)
        ts, sizes = self._grids[num_steps]
        return ts.to(device, copy=True), sizes.to(device, copy=True)  # callers may not touch the cache

    def set_timesteps(self, num_steps: int, device: torch.device | str = "cpu") -> None:
        """Diffusers-style: fill `timesteps` and `step_sizes` for `num_steps` stochastic steps (+1 final)."""
        self.timesteps, self.step_sizes = self.timestep_grid(num_steps, device)
        self.num_inference_steps = int(num_steps)

    @staticmethod
    def guide(v: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
        """CFG on velocity: rows are [cond; uncond], v = v_u + w (v_c - v_u). None: unguided, unchanged."""
        if cfg_scale is None:
            return v
        v_c, v_u = v.chunk(2, dim=0)
        return v_u + cfg_scale * (v_c - v_u)

    def step(
        self,
        velocity: torch.Tensor,
        index: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        temperature: float | None = 1.0,
    ) -> torch.Tensor:
        """One update of x with an (already guided) velocity at step `index` of `set_timesteps`.

        index < N: Euler-Maruyama, score = (t v - x) / var with var = (1 - t)^2 + t (1 - t) (= 1 - t, written as
        the official code does so the fp32 rounding agrees), drift = v + (1 - t) score,
        x += drift dt + temperature sqrt(2 (1 - t) dt) N(0, I). index == N: x += v dt (deterministic).
        """
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_steps) before step()")
        t = self.timesteps[index].to(sample.device)
        dt = self.step_sizes[index].to(sample.device)
        final = index == self.num_inference_steps
        return self._update(sample.float(), velocity.float(), t, dt, final, generator, _flow_temperature(temperature))

    @staticmethod
    def _update(x, v, t, dt, final: bool, generator, temperature: float = 1.0):
        """The official fp32 update (temperature 1); t and dt are 0-dim fp32 tensors."""
        if final:
            return x + v * dt
        score = (t * v - x) / ((1.0 - t) ** 2 + t * (1.0 - t))  # sigma^2 + t sigma, in the official order
        drift = v + (1.0 - t) * score
        eps = random_on("normal", x.shape, generator, x.device)  # drawn at any temperature: the same stream
        return x + drift * dt + temperature * (2.0 * (1.0 - t) * dt) ** 0.5 * eps  # 1.0 * y == y: official at 1

    @torch.no_grad()
    def sample(
        self,
        net_fn: NetFn,
        shape: tuple[int, ...] | None = None,
        noise: torch.Tensor | None = None,
        num_steps: int = 100,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        binarize: bool = True,
        temperature: float | None = 1.0,
    ) -> torch.Tensor:
        """Draw x (b, ..., k) from the flow; exactly ±1 when `binarize` (x > 0 -> +1, else -1).

        temperature scales the noise of the stochastic steps (1: the official sampler; the start noise is not scaled).

        net_fn sees 2b rows [x; x] when cfg_scale is a float (the head pairs them with [cond; uncond])
        and b rows when it is None. The official code uses torch.sign, which would leave an exact 0 at 0;
        we map 0 to -1 so tokens are always valid bits (ref §9.1).
        """
        if noise is None:
            if shape is None:
                raise ValueError("give either shape or noise")
            dev = torch.device(device) if device is not None else (generator.device if generator else "cpu")
        else:
            dev = noise.device
        temperature = _flow_temperature(temperature)
        ts, dts = self.timestep_grid(num_steps)  # CPU 0-dim scalars mix with tensors on any device
        if noise is None:
            x = random_on("normal", shape, generator, dev)  # (b, ..., k) fp32
        else:
            x = noise.float().clone()
        rows = x.shape[0] * (1 if cfg_scale is None else 2)
        t_batch = torch.empty(rows, dtype=torch.float32, device=dev)  # (rows,)
        for i in range(num_steps + 1):
            t, dt = ts[i], dts[i]
            t_batch.fill_(float(t))  # exact: an fp32 value round-trips through a Python float
            xin = x if cfg_scale is None else torch.cat([x, x], dim=0)  # (rows, ..., k)
            v = self.guide(self.velocity(net_fn(xin, t_batch).float(), xin, t_batch), cfg_scale)  # fp32
            x = self._update(x, v, t, dt, i == num_steps, generator, temperature)
        return to_bits(x) if binarize else x


def check_temperature(temperature: float | None) -> float | None:
    """A sampling temperature as a finite float >= 0 (NaN would pass every comparison silently, and infinite
    noise turns every bit into NaN, then -1); None (the model's own) passes through."""
    if temperature is None:
        return None
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UserError(f"sampling temperature must be finite and >= 0, got {temperature}")
    return float(temperature)


def _flow_temperature(temperature: float | None) -> float:
    """The flow has no model default to fall back on: None is the official sampler's 1."""
    return 1.0 if temperature is None else check_temperature(temperature)


def to_bits(x: torch.Tensor) -> torch.Tensor:
    """x > 0 -> +1, else -1 (fp32). Unlike torch.sign, an exact 0 becomes -1, so bits are always valid."""
    return torch.where(x > 0, 1.0, -1.0).to(torch.float32)

