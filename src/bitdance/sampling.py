"""Next-patch sampling for `BitDance`, with a KV cache (or cache-free recomputation) and guidance.

Official behaviour (ref §3.1, §8): CFG doubles the batch as [cond; null]. The linear schedule uses scale
1 + (s - 1) * i / S at AR step i, so step 0 runs at exactly 1.0: there the head samples unguided on the whole
doubled batch and each branch is fed its own tokens. From scale > 1 on, the head returns one guided sample per
image and both branches are fed the same tokens.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"; not in the official
code): with a `guide_model`, the guiding branch is a weaker generator of the same tokens (smaller, or trained
less) on the same class instead of this model on the null class. Both generators keep their own KV cache and are
fed the same tokens; the schedules are those of CFG, and no class dropout is needed.
"""

from __future__ import annotations

import math
import warnings

import torch
from tqdm.auto import tqdm

from bitdance.models.transformer import check_cfg_schedule
from bitdance.utils import UserError


def cfg_scale_at(step: int, num_steps: int, cfg_scale: float, schedule: str) -> float:
    """Guidance scale at AR step `step` of `num_steps`."""
    if check_cfg_schedule(schedule) == "constant":
        return float(cfg_scale)
    return 1.0 + (cfg_scale - 1.0) * step / num_steps  # linear


def sampling_settings(config, num_steps: int | None = None, cfg_scale: float | None = None,
                      cfg_schedule: str | None = None, guided: bool = False) -> tuple[int, float, str]:
    """(head steps, cfg scale, cfg schedule) for a model of `config` (BitDanceConfig): None takes the model's
    default; a value no sampler accepts is a UserError, so callers can check before any long work. guided: the
    scale is for a guide model (autoguidance), which needs no null class."""
    if num_steps is not None and (isinstance(num_steps, bool) or not math.isfinite(num_steps)
                                  or num_steps != int(num_steps)):
        raise UserError(f"the number of head sampling steps must be a whole number, got {num_steps!r}")
    num_steps = config.num_sampling_steps if num_steps is None else int(num_steps)
    cfg_scale = config.cfg_scale if cfg_scale is None else float(cfg_scale)
    cfg_schedule = check_cfg_schedule(config.cfg_schedule if cfg_schedule is None else cfg_schedule)
    # NaN compares False both ways (it would sample unguided); inf makes every velocity inf, every bit -1
    if not (cfg_scale >= 1.0 and math.isfinite(cfg_scale)):
        raise UserError(f"cfg scale must be finite and >= 1 (1 turns guidance off), got {cfg_scale}")
    if cfg_scale > 1.0 and config.class_dropout == 0 and not guided:
        raise UserError(f"cfg scale {cfg_scale:g} needs a model trained with class dropout: this one never saw its "
                        "null class, so there is nothing to guide away from (use cfg 1)")
    if num_steps < 1:
        raise UserError(f"the number of head sampling steps must be >= 1, got {num_steps}")
    return num_steps, cfg_scale, cfg_schedule


@torch.no_grad()
def generate(
    model,
    class_labels: torch.Tensor,
    num_steps: int | None = None,
    cfg_scale: float | None = None,
    cfg_schedule: str | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    progress: bool = True,
    temperature: float | None = None,
    guide_model=None,
) -> torch.Tensor:
    """Sample token codes (b, k, h, w) in ±1 for class ids (b,). None arguments take the model config's defaults.

    num_steps: head sampling steps per AR step. use_cache=False recomputes the whole prefix at every AR step
    (slow; the same random draws in the same order as the cached path). temperature: the head's sampling
    temperature (None: the model's; diffusion head: the scale of the flow sampler's per-step noise; bitwise head:
    the softmax's). guide_model: a weaker `BitDance` of the same tokens to guide with (autoguidance, see the
    module docstring) instead of the null class; `cfg_scale` is then the autoguidance scale.
    """
    c = model.config
    guided = guide_model is not None
    if guided:
        check_guide(model, guide_model)
    num_steps, cfg_scale, cfg_schedule = sampling_settings(c, num_steps, cfg_scale, cfg_schedule, guided)

    device = model.norm.weight.device
    labels = torch.as_tensor(class_labels)
    if labels.numel() == 0:  # before the dtype: an empty list becomes a float tensor
        raise UserError("no class labels given")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim > 1:
        # a cast would make 1.9 class 1 and flatten a (b, 2) batch without a word
        raise UserError(f"class labels must be integers, one per image; got {labels.dtype} of shape "
                        f"{tuple(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.long).reshape(-1)  # (b,)
    if int(labels.min()) < 0 or int(labels.max()) >= c.num_classes:
        raise UserError(f"class labels must be in 0..{c.num_classes - 1}, got {labels.tolist()}")

    b, S = labels.shape[0], c.num_steps
    # cfg_scale == 1 means every step is unguided under either schedule: the official code then skips the null branch
    use_cfg = cfg_scale > 1.0
    if use_cfg and cfg_schedule == "linear" and S == 1:
        # a warning (Python shows it once per process), not a log record on every batch of every rank
        warnings.warn(f"one AR step: the linear guidance schedule is 1 at its only step, so cfg {cfg_scale:g} does "
                      "nothing (as in the official code); use cfg_schedule='constant' to guide", stacklevel=2)
    # the null-class branch doubles the batch; a guide model runs the same b rows beside the model
    ids = torch.cat([labels, torch.full_like(labels, model.null_class)]) if use_cfg and not guided else labels  # (m,)
    m = ids.shape[0]
    models = [model, guide_model] if guided and use_cfg else [model]  # a guide at scale 1 would change nothing

    was_training = [net.training for net in models]
    for net in models:
        net.eval()
    try:
        if use_cache:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
            for net in models:
                net.setup_cache(m, dtype=dtype, device=device)
            conds = [net.prefill(ids) for net in models]  # each (m, p, d)
        else:
            fed = torch.zeros(m, 0, c.token_bits, device=device)  # (m, 0, k) tokens fed so far, patch order
            conds = [net.prefix_conditions(ids, fed) for net in models]
        out = []
        for i in tqdm(range(S), desc="sampling", disable=not progress, leave=False):
            scale = cfg_scale_at(i, S, cfg_scale, cfg_schedule)
            cond = conds[0]
            if guided and scale > 1.0:
                guide = (guide_model.head, conds[1])
                feed = x = model.head.sample(cond, num_steps, scale, generator, temperature=temperature,
                                             guide=guide)  # (b, p, k)
            elif use_cfg and scale > 1.0:
                x = model.head.sample(cond, num_steps, scale, generator, temperature=temperature)  # (b, p, k)
                feed = torch.cat([x, x], dim=0)  # (m, p, k): both branches see the same tokens
            else:
                # (m, p, k): each row its own
                feed = model.head.sample(cond, num_steps, None, generator, temperature=temperature)
                x = feed[:b]
            out.append(x)
            if i + 1 < S:
                if use_cache:
                    conds = [net.decode_step(feed, i + 1) for net in models]
                else:
                    fed = torch.cat([fed, feed.to(fed.dtype)], dim=1)
                    conds = [net.prefix_conditions(ids, fed) for net in models]
    finally:
        for net, mode in zip(models, was_training):
            if use_cache:
                net.clear_cache()
            net.train(mode)

    tokens = model.to_raster_order(torch.cat(out, dim=1).float())  # (b, n, k) raster
    h, w = c.grid_size
    return tokens.transpose(1, 2).reshape(b, c.token_bits, h, w)  # (b, k, h, w)


def check_guide(model, guide_model) -> None:
    """A guide model must sample the same tokens the same way: bits per token, patch, grid, classes and head kind
    (its width and depth are free: a smaller network is the usual guide)."""
    fields = ("token_bits", "parallel", "grid_size", "num_classes", "head")  # the config keeps the grid a tuple
    diff = [f"{f} {getattr(guide_model.config, f)} (model: {getattr(model.config, f)})" for f in fields
            if getattr(guide_model.config, f) != getattr(model.config, f)]
    if diff:
        raise UserError("the guide model does not match the model: " + ", ".join(diff))
