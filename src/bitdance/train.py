"""Generator training: `run(TrainConfig) -> Path` of the exported pipeline folder (`bitdance train`).

The frozen tokenizer encodes the data set once; the codes are cached as int8 (out/tokens.safetensors) and the
AR model trains on them, so no step ever runs the encoder. Recipe (ref §3.1): AdamW betas (0.9, 0.95), weight
decay 0.05 except `proj_in`, `cls_embedding`, `query_token` and parameters with ndim < 2; linear warmup + cosine
to min_lr (from step `schedule_start`, 0 unless a finished run is extended); grad clip 1.0; EMA; label dropout
and input bit flips inside the model; optional horizontal flips (flipped IMAGES are encoded into a second cache;
each sample picks a version at random).

Run folder:
    config.json          train + model config, world size, data summary, class names
    checkpoint.pt        model / ema / optimizer / step / config (plain dict; weights_only loadable); auto-resumed
    losses.jsonl         one line per log interval; loss_curve.png
    samples/             EMA sample grids (a row per class) at each checkpoint; samples.png = the latest
    tokens*.safetensors  the token cache
    log.txt              the log
    model/               final export: tokenizer/ + generator/ (EMA weights) + model_index.json

Randomness: step s on rank r draws from a generator seeded (seed * world + r) * 1_000_003 + s, so a resumed run
repeats exactly the draws it would have made without stopping.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bitdance.data import (
    ImageDataset,
    InfiniteBatches,
    encode_dataset,
    encode_images,
    load_dataset,
    read_token_cache,
    token_cache_key,
    tokenizer_fingerprint,
    write_token_cache,
)
from bitdance.models.autoencoder import ImageTokenizer
from bitdance.models.transformer import BITDANCE_PRESETS, BitDance, BitDanceConfig
from bitdance.pipeline import BitDancePipeline, decode_codes, resolve_tokenizer_path
from bitdance.sampling import generate
from bitdance.utils import (
    JsonlLog,
    StepBoundaryInterrupt,
    UserError,
    any_rank,
    autocast,
    barrier,
    changed_fields,
    check_finite,
    check_loop_options,
    check_training_dtype,
    cleanup_distributed,
    copy_file_atomic,
    cosine_lr,
    count_parameters,
    ema_decay_at,
    find_resume_checkpoint,
    first_line,
    init_distributed,
    load_checkpoint,
    plot_curves,
    run_logger,
    save_checkpoint,
    save_image_grid,
    step_seed,
    update_ema,
    write_json,
)

CHECKPOINT_NAME = "checkpoint.pt"
NO_DECAY = ("proj_in", "cls_embedding", "query_token")  # official: no weight decay for these (ref §3.1)


@dataclass
class TrainConfig:
    tokenizer: str = ""  # tokenizer folder (save_pretrained output, a tokenizer run folder or a pipeline folder)
    data: str = ""  # image folder (class subfolders or flat) or Fashion-MNIST IDX folder
    out: str = "runs/gen"
    preset: str = "fmnist"
    parallel: int = 1  # tokens per AR step (1, 4, 16, 64)
    head: str = "diffusion"  # "diffusion" | "bitwise"
    steps: int = 4000
    batch_size: int = 64  # global; per rank = batch_size / world size
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 200
    schedule_start: int = 0  # the step where warmup + cosine begin: extend a finished run with a fresh schedule
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # warmed up: min(decay, (1 + step) / (10 + step))
    export_ema: bool = True
    # model overrides (None: the preset's); saved with the generator
    model_args: dict | None = None  # any other BitDanceConfig fields over the preset, e.g. {"dim": 384}
    class_dropout: float | None = None
    perturb_rate: float | None = None
    cfg_scale: float | None = None  # default guidance scale for sampling
    cfg_schedule: str | None = None
    sampling_steps: int | None = None  # default head steps for sampling
    hflip: bool = False
    token_cache: str | None = None  # default: out/tokens.safetensors
    encode_batch_size: int = 256
    dtype: str = "float32"
    device: str | None = None
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    sample_every: int | None = None  # None: with every checkpoint
    samples_per_class: int = 4  # grid columns; each grid costs a full sampling run
    max_grid_classes: int = 10
    stop_after: int | None = None  # stop (and save) after this many steps of this invocation; schedule keeps --steps
    resume: str | None = None  # checkpoint file or run folder; out/checkpoint.pt is resumed automatically
    progress: bool = True


def run(config: TrainConfig) -> Path:
    """Train a BitDance generator on a frozen tokenizer's codes; returns `out/model` (the pipeline folder)."""
    info = init_distributed(config.device)
    try:
        _validate(config, info.world_size)
        with run_logger(config.out, info, "bitdance.train") as logger:
            return _train(config, Path(config.out), info, logger)
    finally:
        cleanup_distributed(info)


# ----------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------


def _validate(cfg: TrainConfig, world: int) -> None:
    if not cfg.tokenizer:
        raise UserError("no tokenizer given (--tokenizer DIR, e.g. the model/ folder of `bitdance tokenizer train`)")
    if not cfg.data:
        raise UserError("no training data given (--data PATH)")
    if cfg.preset not in BITDANCE_PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(BITDANCE_PRESETS)}")
    check_loop_options(cfg.steps, cfg.batch_size, world, cfg.save_every, cfg.log_every, cfg.ema_decay,
                       {"--sample-every": cfg.sample_every})
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise UserError(f"--stop-after must be at least 1 step, got {cfg.stop_after}")
    if not 0 <= cfg.schedule_start < cfg.steps:
        raise UserError(f"--schedule-start must be in [0, --steps), got {cfg.schedule_start} (--steps {cfg.steps})")
    # NaN fails these comparisons too; a negative --min-lr would end the cosine in gradient ascent
    if not (cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr):
        raise UserError(f"--lr must be > 0 and --min-lr in [0, --lr], got {cfg.lr} and {cfg.min_lr}")
    if not cfg.weight_decay >= 0:
        raise UserError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if cfg.samples_per_class < 1 or cfg.max_grid_classes < 1:  # the grids are drawn at checkpoints, on rank 0 only
        raise UserError("--samples-per-class and --max-grid-classes must be at least 1 (--sample-every 0 turns the "
                        "grids off)")
    check_training_dtype(cfg.dtype)


def load_tokenizer(path: str | Path, device) -> ImageTokenizer:
    """A tokenizer folder, a tokenizer run folder (holding model/) or a pipeline folder (holding tokenizer/)."""
    return ImageTokenizer.from_pretrained(resolve_tokenizer_path(path), device=device).eval().requires_grad_(False)


class FlippedImages(ImageDataset):
    """The same images mirrored left-right (the second token cache of --hflip)."""

    def __init__(self, base: ImageDataset):
        self.base = base
        self.resolution, self.channels = base.resolution, base.channels
        self.class_names, self.source = base.class_names, f"{base.source} (hflip)"

    def __len__(self) -> int:
        return len(self.base)

    def get_batch(self, indices):
        images, labels = self.base.get_batch(indices)
        return images.flip(-1), labels  # (b, c, H, W)

    def fingerprint(self) -> str:
        return self.base.fingerprint() + "-hflip"


class TokenSet:
    """Cached tokens for `InfiniteBatches`: get_batch -> (int8 (b, v, n, k) raster tokens, v versions; labels)."""

    def __init__(self, versions: list[torch.Tensor], labels: torch.Tensor):
        self.tokens = torch.stack(versions, dim=1)  # (N, v, n, k) int8
        self.labels = labels

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def get_batch(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.tokens[idx], self.labels[idx]


def codes_to_tokens(codes: torch.Tensor) -> torch.Tensor:
    """(N, k, h, w) -> (N, h*w, k) raster order, dtype kept (int8 in the cache)."""
    return codes.flatten(2).transpose(1, 2).contiguous()


def _encode(tokenizer, dataset, cfg: TrainConfig, out: Path, info, logger):
    """The data's tokens, from the cache or encoded once, each rank its share (under DDP rank 0 joins the shares
    into the cache: no rank waits at a barrier while one rank encodes everything). Returns (versions, labels)."""
    cache = Path(cfg.token_cache) if cfg.token_cache else out / "tokens.safetensors"
    sets = [(dataset, cache)]
    if cfg.hflip:
        sets.append((FlippedImages(dataset), cache.with_name(cache.stem + "_hflip" + cache.suffix)))
    versions, labels = [], None
    for ds, path in sets:
        if info.enabled:
            codes, labels = _encode_shared(tokenizer, ds, path, cfg, out, info)
        else:
            codes, labels = encode_dataset(tokenizer, ds, cfg.encode_batch_size, info.device, path,
                                           progress=cfg.progress)
        versions.append(codes_to_tokens(codes))  # (N, n, k) int8
    logger.info("tokens: %d images x %d versions, %s", len(labels), len(versions), cache)
    return versions, labels


def _encode_shared(tokenizer, ds, path: Path, cfg: TrainConfig, out: Path, info):
    """DDP: the tokens of `ds` from the cache at `path` if every rank finds it valid, else encoded, each rank a
    contiguous share; rank 0 joins the shares (in rank order: the order one process gives) into the cache. The
    part files live in this run's `out`, so runs sharing a cache never collide; `out` and the cache must be on a
    filesystem every rank sees."""
    key = token_cache_key(tokenizer, ds)
    cached = read_token_cache(path, key)  # every rank reads before any rank writes (the barriers below)
    if not any_rank(cached is None, info):  # all ranks take the same branch, or the barriers hang
        return cached
    n, r, w = len(ds), info.rank, info.world_size
    share = encode_images(tokenizer, ds, cfg.encode_batch_size, info.device, n * r // w, n * (r + 1) // w,
                          progress=info.is_main and cfg.progress)
    parts = [out / f"{path.stem}.part{i}of{w}{path.suffix}" for i in range(w)]
    write_token_cache(parts[r], *share, key, ds.source)
    del share
    barrier(info)
    joined = None
    if info.is_main:
        shares = [read_token_cache(p, key) for p in parts]
        if any(x is None for x in shares):
            raise UserError(f"a rank's share of the tokens is missing or unreadable in {out}")
        shares = [x for x in shares if x[0].numel()]  # more ranks than images: empty shares
        joined = torch.cat([c for c, _ in shares]), torch.cat([y for _, y in shares])
        del shares
        write_token_cache(path, *joined, key, ds.source)
        for p in parts:
            p.unlink()
    barrier(info)
    if joined is None:
        joined = read_token_cache(path, key)
        if joined is None:
            raise UserError(f"cannot read the token cache {path} that rank 0 wrote (is it on a shared filesystem?)")
    return joined


def _classes(dataset, labels: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Labels 0..C-1 and class names; a flat unlabelled folder is one class (unconditional)."""
    if (labels < 0).any():
        return torch.zeros_like(labels), ["image"]
    names = list(dataset.class_names or [])
    top = int(labels.max()) + 1
    if len(names) < top:
        names += [str(i) for i in range(len(names), top)]
    return labels, names


# fields fixed by the tokenizer and the data set, or set by their own flags: not for --model-arg
DERIVED_FIELDS = ("num_classes", "token_bits", "grid_size", "parallel", "head", "grad_checkpointing")


def build_model_config(cfg: TrainConfig, tokenizer: ImageTokenizer, num_classes: int) -> BitDanceConfig:
    tc = tokenizer.config
    model_args = dict(cfg.model_args or {})
    fixed = sorted(set(model_args) & set(DERIVED_FIELDS))
    if fixed:
        raise UserError(f"--model-arg cannot set {', '.join(fixed)}: they come from the tokenizer, the data or "
                        "their own flags (--parallel, --head, --grad-checkpointing)")
    overrides = dict(model_args, num_classes=num_classes, token_bits=tc.z_channels, grid_size=tc.token_grid())
    if num_classes == 1:
        # unconditional: nothing to drop and nothing to guide towards (DiT's recipe for one class)
        flags = (("--cfg", cfg.cfg_scale, 1.0), ("--class-dropout", cfg.class_dropout, 0.0))  # (flag, value, no-op)
        asked = [flag for flag, value, no_op in flags if value not in (None, no_op)]
        asked += [f"--model-arg {k}" for k in ("cfg_scale", "class_dropout") if k in model_args]
        if asked:
            raise UserError(f"{', '.join(asked)}: the data has one class (unconditional), so there is no class to "
                            "drop or to guide towards")
        overrides.update(class_dropout=0.0, cfg_scale=1.0)
    for field, value in (("class_dropout", cfg.class_dropout), ("perturb_rate", cfg.perturb_rate),
                         ("cfg_scale", cfg.cfg_scale), ("cfg_schedule", cfg.cfg_schedule),
                         ("num_sampling_steps", cfg.sampling_steps)):
        if value is not None:
            if field in model_args:
                raise UserError(f"{field} is given twice: by its own flag and by --model-arg")
            overrides[field] = value
    try:
        config = BITDANCE_PRESETS[cfg.preset](parallel=cfg.parallel, head=cfg.head, **overrides)
    except (TypeError, ValueError) as e:  # e.g. --model-arg dim=abc: a value of the wrong type
        raise UserError(f"the model settings do not build a model: {first_line(e)}") from None
    if config.class_dropout == 0 and config.cfg_scale > 1:
        if cfg.cfg_scale is not None or "cfg_scale" in model_args:
            raise UserError(f"--cfg {config.cfg_scale:g} needs class dropout > 0: without it the null class that "
                            "guidance steers away from is never trained")
        config = replace(config, cfg_scale=1.0)  # the preset's guidance default cannot apply
    return config


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Official decay split: no decay for proj_in, cls_embedding, query_token and any parameter with ndim < 2."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.split(".")[0] in NO_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# model-config fields that only set sampling defaults: they do not touch the weights
SAMPLING_DEFAULTS = ("cfg_scale", "cfg_schedule", "num_sampling_steps", "head_temperature")


def _restore(path: Path, model_cfg: BitDanceConfig, tok_key: str, model, ema, opt) -> tuple[int, dict, int | None]:
    """Load a checkpoint into model / EMA / optimizer; returns (step, the TrainConfig it was saved with, the
    world size it was trained at, None in older checkpoints)."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not {"model", "ema", "optimizer", "step"} <= set(state):
        raise UserError(f"{path} is not a bitdance generator training checkpoint")
    # sampling defaults do not touch the weights: a resume may change them (rerunning a finished run with a new
    # --cfg re-exports it with that default)
    diff = changed_fields(state.get("model_config", {}), model_cfg, ignore=SAMPLING_DEFAULTS)
    if diff:
        raise UserError(f"{path} was trained with another model config ({', '.join(diff)} differ); "
                        "use a new --out folder or the same --preset/--parallel/--head")
    if state.get("tokenizer_fingerprint") not in (None, tok_key):
        raise UserError(f"{path} was trained on another tokenizer's codes; use a new --out folder")
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not match this model: {first_line(e)}")
    return int(state["step"]), state.get("config", {}), state.get("world_size")


def _check_schedule(cfg: TrainConfig, step: int, saved: dict, logger) -> None:
    """Say what the learning rate does when a resume changes the plan, so a jump is never a surprise."""
    plan = {k: saved[k] for k in ("steps", "lr", "warmup", "min_lr", "schedule_start") if k in saved}
    before = replace(cfg, **plan)  # the schedule the checkpoint was trained under
    planned = before.steps
    changed = [f"--{k.replace('_', '-')} {plan[k]:g} -> {getattr(cfg, k):g}"
               for k in plan if plan[k] != getattr(cfg, k)]
    if not changed:
        return
    old, new = schedule_lr(before, step), schedule_lr(cfg, step)
    if planned != cfg.steps:
        logger.info("the run was planned for %d steps and now for %d: at step %d the learning rate goes %.2e -> "
                    "%.2e", planned, cfg.steps, step, old, new)
    else:
        logger.info("the schedule changed (%s): at step %d the learning rate goes %.2e -> %.2e", ", ".join(changed),
                    step, old, new)
    if cfg.schedule_start == 0 and step >= planned and cfg.steps > planned:  # extended, not just re-tuned
        logger.warning("extending a finished run re-stretches its cosine from step 0; for a fresh warmup + cosine "
                       "over the new steps pass --schedule-start %d (and a --lr for the new peak)", step)


def schedule_lr(cfg: TrainConfig, step: int) -> float:
    """Warmup + cosine from cfg.schedule_start to cfg.steps (before schedule_start: the first warmup step's lr)."""
    return cosine_lr(max(0, step - cfg.schedule_start), cfg.lr, cfg.warmup, cfg.steps - cfg.schedule_start,
                     cfg.min_lr)


class LossLog(JsonlLog):
    """The generator's losses.jsonl, plus its loss-curve plot."""

    def plot(self, out: Path) -> None:
        if self.enabled and self.rows:
            plot_curves({"loss": [(r["step"], r["loss"]) for r in self.rows]}, out / "loss_curve.png",
                        title="generator training loss")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _train(cfg: TrainConfig, out: Path, info, logger) -> Path:
    # -- setup ---------------------------------------------------------------------------------
    device, main = info.device, info.is_main
    local_batch = cfg.batch_size // info.world_size
    tokenizer = load_tokenizer(cfg.tokenizer, device)
    tok_key = tokenizer_fingerprint(tokenizer)

    # -- data: encode once, train on cached ±1 codes ------------------------------------------------
    dataset = load_dataset(cfg.data, tokenizer.config.resolution, tokenizer.config.in_channels, split="train")
    logger.info("data: %s, %d images at %dx%d%s", dataset.source, len(dataset), dataset.resolution,
                dataset.resolution, f", {dataset.skipped} unreadable skipped" if dataset.skipped else "")
    # the model settings (--cfg, --sample-steps, --model-arg) fail now, not after minutes of encoding (a flat
    # folder has no class names: one class, unconditional)
    build_model_config(cfg, tokenizer, num_classes=len(dataset.class_names or ["image"]))
    versions, labels = _encode(tokenizer, dataset, cfg, out, info, logger)
    labels, class_names = _classes(dataset, labels)
    tokens = TokenSet(versions, labels)

    # -- model and EMA --------------------------------------------------------------------------
    model_cfg = build_model_config(cfg, tokenizer, len(class_names))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = BitDance(model_cfg).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing  # a run setting, not saved with the model
    ema = copy.deepcopy(model).eval().requires_grad_(False)

    # -- optimizer and resume -----------------------------------------------------------------------
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    step = 0
    ckpt = find_resume_checkpoint(cfg.resume, out, CHECKPOINT_NAME)
    if ckpt is not None:
        step, saved_cfg, saved_world = _restore(ckpt, model_cfg, tok_key, model, ema, opt)
        logger.info("resumed from %s at step %d", ckpt, step)
        if step > cfg.steps:
            raise UserError(f"{ckpt} is at step {step}, past --steps {cfg.steps}: nothing to train")
        if saved_world not in (None, info.world_size):  # per-rank seeds and data shards follow the world size
            logger.warning("resuming a run of %d process(es) with %d: the weights carry on exactly, but the random "
                           "draws and data order from here differ from an uninterrupted run", saved_world,
                           info.world_size)
        # the optimizer state brought back its saved decay and betas; the flags of this run are the ones that hold
        for group, decay in zip(opt.param_groups, (cfg.weight_decay, 0.0)):  # param_groups(): decay, no decay
            group["weight_decay"], group["betas"] = decay, (cfg.beta1, cfg.beta2)
        _check_schedule(cfg, step, saved_cfg, logger)
    if cfg.schedule_start > step:  # the lr would sit at the warmup's first value until then
        raise UserError(f"--schedule-start {cfg.schedule_start} is after the step this run starts from ({step}): "
                        "a fresh schedule starts where a finished run goes on (the checkpoint's step)")
    if main:
        write_json({"train": asdict(cfg), "model": asdict(model_cfg), "world_size": info.world_size,
                    "tokenizer_fingerprint": tok_key, "class_names": class_names,
                    "data": {"source": dataset.source, "num_images": len(dataset), "skipped": dataset.skipped}},
                   out / "config.json")
    n_params = count_parameters(model)
    logger.info("BitDance %s %dx (%s head), %.2f M parameters, %d classes, %dx%d tokens of %d bits; "
                "%d steps, batch %d (%d per rank x %d)", cfg.preset, cfg.parallel, cfg.head, n_params / 1e6,
                len(class_names), *model_cfg.grid_size, model_cfg.token_bits, cfg.steps, cfg.batch_size,
                local_batch, info.world_size)

    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model)
    if cfg.compile:
        net = torch.compile(net)  # checkpoints always hold the unwrapped `model`
    batches = InfiniteBatches(tokens, local_batch, info.rank, info.world_size, cfg.seed, start_step=step)
    log = LossLog(out / "losses.jsonl", step, main)
    gen = torch.Generator(device=device)
    grid_gen_seed = cfg.seed

    def save(at_step: int) -> None:
        if main:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "step": at_step, "config": asdict(cfg), "model_config": asdict(model_cfg),
                     "class_names": class_names, "tokenizer_fingerprint": tok_key, "world_size": info.world_size}
            save_checkpoint(state, out / CHECKPOINT_NAME)
            log.plot(out)

    def sample_grid(at_step: int) -> None:
        if main:
            path = save_grid(ema, tokenizer, class_names, out / "samples" / f"step_{at_step:07d}.png",
                             cfg.samples_per_class, cfg.max_grid_classes, grid_gen_seed)
            copy_file_atomic(path, out / "samples.png")

    # -- loop ---------------------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not (main and cfg.progress),
               dynamic_ncols=True)
    sample_every = cfg.save_every if cfg.sample_every is None else cfg.sample_every
    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    loss_sum, n_since, t0 = torch.zeros((), device=device), 0, time.time()
    model.train()
    interrupt = StepBoundaryInterrupt(info).install()
    try:
        while step < last:
            interrupt.begin_step()
            lr = schedule_lr(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            gen.manual_seed(step_seed(cfg.seed, info, step))
            x, y = next(batches)  # (b, v, n, k) int8, (b,)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if x.shape[1] > 1:  # --hflip: each sample picks the original or the mirrored image's tokens
                pick = torch.randint(0, x.shape[1], (x.shape[0],), generator=gen, device=device)
                x = x[torch.arange(x.shape[0], device=device), pick]  # (b, n, k)
            else:
                x = x[:, 0]
            x = x.float()  # ±1

            with autocast(device, cfg.dtype):
                loss = net(x, y, generator=gen)
            loss = loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e12)
            check_finite(step + 1, info, loss=loss, gradient_norm=grad_norm)
            opt.step()
            update_ema(ema, model, ema_decay_at(cfg.ema_decay, step))
            step += 1
            n_since += 1
            loss_sum += loss.detach()
            bar.update(1)

            if step % cfg.log_every == 0 or step == last:
                mean = loss_sum / n_since
                if info.enabled:
                    dist.all_reduce(mean)  # the global-batch loss: mean over ranks of per-rank means
                    mean = mean / info.world_size
                dt = time.time() - t0
                row = {"step": step, "loss": round(float(mean), 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                       "img_per_s": round(n_since * cfg.batch_size / max(dt, 1e-9), 1)}
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if not cfg.progress:
                    logger.info("step %d: loss %.4f, lr %.2e, %.1f img/s", step, row["loss"], lr, row["img_per_s"])
                loss_sum.zero_()
                n_since, t0 = 0, time.time()
            interrupt.end_step()  # a Ctrl-C during the update stops here, with the state whole and logged
            t_pause = time.time()
            saving = step % cfg.save_every == 0 or step == last
            sampling = sample_every and (step % sample_every == 0 or step == cfg.steps)
            if saving or sampling:
                with interrupt.deferred():
                    if saving:
                        save(step)
                    if sampling:
                        sample_grid(step)
                    if saving:
                        barrier(info)
            t0 += time.time() - t_pause  # img/s counts training only
    except KeyboardInterrupt:
        interrupt.save_on_interrupt(save, step, logger)
        raise
    finally:
        interrupt.restore()
        bar.close()

    # -- export -----------------------------------------------------------------------------------
    if step < cfg.steps:
        logger.info("stopped at step %d of %d (--stop-after); run again to continue", step, cfg.steps)
        return out / CHECKPOINT_NAME
    if main:
        export = ema if cfg.export_ema else model
        BitDancePipeline(tokenizer, copy.deepcopy(export).eval(), class_names).save_pretrained(out / "model")
        logger.info("exported %s weights to %s", "EMA" if cfg.export_ema else "raw", out / "model")
    barrier(info)
    return out / "model"


@torch.no_grad()
def save_grid(model: BitDance, tokenizer: ImageTokenizer, class_names: list[str], path: Path,
              per_class: int = 8, max_classes: int = 10, seed: int = 0) -> Path:
    """Sample `per_class` images for up to `max_classes` evenly spaced classes; one labelled row per class."""
    n = len(class_names)
    classes = torch.linspace(0, n - 1, min(n, max_classes)).round().long().unique()
    device = model.norm.weight.device
    labels = classes.repeat_interleave(per_class).to(device)  # (rows * per_class,)
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = generate(model, labels, generator=gen, progress=False)  # (b, k, h, w)
    images = decode_codes(tokenizer, codes, generator=gen).float().clamp(-1, 1).cpu()  # (b, c, H, W)
    scale = max(1, 64 // images.shape[-1])
    return save_image_grid(images, path, nrow=per_class, row_labels=[class_names[int(c)] for c in classes],
                           scale=scale)

