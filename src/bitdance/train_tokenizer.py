"""Tokenizer training: `run(TokenizerTrainConfig) -> Path` of the exported model folder.

Loss = L1 reconstruction + entropy_weight * entropy + commit_weight * commitment (+ the VQ codebook loss)
[+ lpips_weight * LPIPS] [+ disc_weight * generator loss from step disc_start + disc_warmup; the discriminator
learns from disc_start], the WeTok recipe the
reference traces the BitDance tokenizer to (ref §2.3). AdamW with warmup + cosine decay, gradient clipping,
an EMA copy exported at the end, atomic resumable checkpoints, DDP under torchrun (rank 0 writes).

Run folder:
    config.json        the run's settings (train + tokenizer config, world size, data summary)
    checkpoint.pt      model / ema / optimizer / disc / step / config (a plain dict; weights_only loadable)
    losses.jsonl       one line per log interval (and eval results); loss_curve.png, psnr_curve.png
    samples/           reconstruction grids (inputs above reconstructions); reconstructions.png = the last one
    log.txt            the log
    model/             final export: save_pretrained of the EMA weights
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bitdance.data import InfiniteBatches, eval_indices, load_dataset
from bitdance.losses import (
    LPIPS,
    DiscriminatorConfig,
    LeCam,
    LPIPSConfig,
    PatchDiscriminator,
    generator_loss,
    hinge_d_loss,
)
from bitdance.metrics import evaluate_tokenizer
from bitdance.models.autoencoder import TOKENIZER_PRESETS, ImageTokenizer, TokenizerConfig
from bitdance.utils import (
    JsonlLog,
    StepBoundaryInterrupt,
    UserError,
    autocast,
    barrier,
    changed_fields,
    check_finite,
    check_loop_options,
    check_training_dtype,
    cleanup_distributed,
    config_from_dict,
    copy_file_atomic,
    cosine_lr,
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


@dataclass
class TokenizerTrainConfig:
    data: str = ""  # image folder or Fashion-MNIST IDX folder
    out: str = "runs/tokenizer"
    preset: str = "fmnist"
    quantizer: str | None = None  # override the preset's "binary" | "vq"
    group_size: int | None = None  # override bits per entropy / VQ group
    steps: int = 2000
    max_minutes: float = 0.0  # > 0: stop after this much training time (resumes included); lr follows the clock
    batch_size: int = 64  # global; per rank = batch_size / world size
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    export_ema: bool = True
    entropy_weight: float = 0.1
    commit_weight: float = 0.25
    lpips_weight: float = 0.0
    lpips_weights: str | None = None  # local LPIPS-VGG16 file (see losses.LPIPS)
    disc_weight: float = 0.0  # generator adversarial weight; 0 = no GAN
    disc_start: int = 0
    # steps from disc_start in which only the discriminator learns before the decoder feels it. Measured on the
    # built-in decoder fine-tune (docs/results.md section 5): it does not prevent the decoder's L1 excursion when the
    # GAN term starts (0.05 -> 0.20 without, -> 0.26 after a 400-step warm-up), it only moves it later; off by default
    disc_warmup: int = 0
    disc_lr: float | None = None  # None: same as lr
    lecam_weight: float = 0.05
    gen_loss: str = "non_saturating"  # "non_saturating" | "hinge"
    dtype: str = "float32"
    device: str | None = None
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    save_every: int = 500
    eval_every: int = 0  # 0: only at the end when eval_images > 0
    eval_split: str = "test"
    eval_images: int = 1000  # 0: no evaluation
    resume: str | None = None  # checkpoint file or run folder; the out folder's own checkpoint is auto-resumed
    init_from: str | None = None  # tokenizer folder (save_pretrained) to start from; its config replaces the preset's
    decoder_only: bool = False  # freeze encoder + quantizer: codes stay bit-identical, generators stay valid
    gan_decoder: bool = False  # the noise-concat decoder; a plain --init-from decoder is widened to it, unchanged
    progress: bool = True


def build_tokenizer_config(cfg: TokenizerTrainConfig) -> TokenizerConfig:
    if cfg.preset not in TOKENIZER_PRESETS:
        raise UserError(f"unknown tokenizer preset {cfg.preset!r}; choose one of {', '.join(TOKENIZER_PRESETS)}")
    tok = TOKENIZER_PRESETS[cfg.preset]()
    changes = {}
    if cfg.quantizer is not None:
        changes["quantizer"] = cfg.quantizer
    if cfg.group_size is not None:
        changes["group_size"] = cfg.group_size
    if cfg.gan_decoder:
        changes["gan_decoder"] = True
    return config_from_dict(TokenizerConfig, {**asdict(tok), **changes}) if changes else tok


class TokenizerLog(JsonlLog):
    """The tokenizer's losses.jsonl, plus its loss and test-PSNR curves."""

    def plot(self, out: Path) -> None:
        if not self.enabled:
            return
        train = [r for r in self.rows if "loss" in r]
        series = {k: [(r["step"], r[k]) for r in train if k in r] for k in ("loss", "l1")}
        if train:
            plot_curves(series, out / "loss_curve.png", title="tokenizer training loss")
        evals = [(r["step"], r["eval_psnr"]) for r in self.rows if "eval_psnr" in r]
        if evals:
            plot_curves({"test PSNR (dB)": evals}, out / "psnr_curve.png", title="EMA reconstruction PSNR")


def run(config: TokenizerTrainConfig) -> Path:
    """Train a tokenizer; returns the exported model folder (`out/model`)."""
    cfg = config
    out = Path(cfg.out)
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, out, info)
    finally:
        cleanup_distributed(info)


def _train(cfg: TokenizerTrainConfig, out: Path, info) -> Path:
    with run_logger(out, info, "bitdance.train_tokenizer") as logger:
        return _train_loop(cfg, out, info, logger)


def _train_loop(cfg: TokenizerTrainConfig, out: Path, info, logger) -> Path:
    device, main = info.device, info.is_main
    if not cfg.data:
        raise UserError("no training data given (--data PATH)")
    check_loop_options(cfg.steps, cfg.batch_size, info.world_size, cfg.save_every, cfg.log_every, cfg.ema_decay,
                       {"--sample-every": cfg.sample_every, "--eval-every": cfg.eval_every})
    _check_options(cfg)
    check_training_dtype(cfg.dtype)
    local_batch = cfg.batch_size // info.world_size
    init = None
    if cfg.init_from:
        if cfg.quantizer is not None or cfg.group_size is not None:
            raise UserError("--init-from takes the tokenizer config from that folder; drop --quantizer/--group-size")
        from bitdance.pipeline import resolve_tokenizer_path

        init = ImageTokenizer.from_pretrained(resolve_tokenizer_path(cfg.init_from))
        if cfg.gan_decoder and not init.config.gan_decoder:
            init = init.with_noise_decoder()  # starts out decoding exactly as before
        elif cfg.gan_decoder:
            logger.info("%s already has a noise-concat decoder: --gan-decoder changes nothing", cfg.init_from)
        tok_cfg = init.config
    elif cfg.decoder_only:
        raise UserError("--decoder-only fine-tunes an existing tokenizer's decoder: give --init-from FOLDER")
    else:
        tok_cfg = build_tokenizer_config(cfg)

    dataset = load_dataset(cfg.data, tok_cfg.resolution, tok_cfg.in_channels, split="train")
    logger.info("data: %s, %d images at %dx%d, %d channel(s)%s", dataset.source, len(dataset), dataset.resolution,
                dataset.resolution, dataset.channels, f", {dataset.skipped} skipped" if dataset.skipped else "")
    # opened now, on every rank: a mistyped --eval-split or a train-only folder must fail before the training
    # steps, not after them (and on all ranks alike, so that none waits for the others at a barrier)
    eval_set = None
    if cfg.eval_images > 0:
        eval_set = load_dataset(cfg.data, tok_cfg.resolution, tok_cfg.in_channels, split=cfg.eval_split)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = (init if init is not None else ImageTokenizer(tok_cfg)).to(device)
    if cfg.decoder_only:
        # the encoder and quantizer define the codes a generator was trained on: frozen, they stay bit-identical
        # (the EMA of an unchanged tensor is that tensor), so only the image decoded from each code changes
        model.encoder.requires_grad_(False)
        model.quantize.requires_grad_(False)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    disc = disc_opt = lecam = None
    disc_lr = cfg.lr if cfg.disc_lr is None else cfg.disc_lr  # peak; follows the generator's schedule
    if cfg.disc_weight > 0:
        # 3 layers (WeTok) for >= 32 px; fewer for smaller images so that the patch map stays >= 1x1
        n_layers = max(1, min(3, (tok_cfg.resolution // 4).bit_length() - 1))
        disc = PatchDiscriminator(DiscriminatorConfig(in_channels=tok_cfg.out_channels, n_layers=n_layers)).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=disc_lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        lecam = LeCam(distributed=info.enabled).to(device)
    lpips = LPIPS(LPIPSConfig(cfg.lpips_weights)).to(device) if cfg.lpips_weight > 0 else None

    step, train_s = 0, 0.0  # optimizer steps done, seconds spent in training steps (evals excluded)
    ckpt_path = find_resume_checkpoint(cfg.resume, out, CHECKPOINT_NAME)
    if ckpt_path is not None:
        step, train_s = _restore(ckpt_path, tok_cfg, model, ema, opt, disc, disc_opt, lecam)
        logger.info("resumed from %s at step %d", ckpt_path, step)
    budget_s = cfg.max_minutes * 60.0
    if main:
        write_json({"train": asdict(cfg), "tokenizer": asdict(tok_cfg), "world_size": info.world_size,
                    "data": {"source": dataset.source, "num_images": len(dataset), "skipped": dataset.skipped,
                             "class_names": dataset.class_names}}, out / "config.json")
    n_params = sum(p.numel() for p in trainable)
    logger.info("tokenizer %s (%s, %d bits/token), %.2f M trainable parameters%s; "
                "%d steps, batch %d (%d per rank x %d)",
                cfg.init_from or cfg.preset, tok_cfg.quantizer, tok_cfg.z_channels, n_params / 1e6,
                " (decoder only)" if cfg.decoder_only else "", cfg.steps, cfg.batch_size,
                local_batch, info.world_size)

    net, dnet = model, disc
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model)
        if disc is not None:
            dnet = nn.parallel.DistributedDataParallel(disc)
    batches = InfiniteBatches(dataset, local_batch, info.rank, info.world_size, cfg.seed, start_step=step)
    fixed, _ = dataset.get_batch(eval_indices(len(dataset), 8))  # (8, c, H, W) for the reconstruction grid
    log = TokenizerLog(out / "losses.jsonl", step, main)
    last_sample = None  # the step of the last reconstruction grid, so the final one is not rendered twice

    def evaluate(at_step: int) -> dict:
        res = evaluate_tokenizer(ema, eval_set, cfg.eval_images, batch_size=max(local_batch, 64), device=device)
        log.write({"step": at_step, "eval_psnr": res["psnr"], "eval_ssim": res["ssim"],
                   "eval_perplexity": res.get("perplexity_per_group"), "eval_images": res["num_images"]})
        logger.info("step %d: test PSNR %.2f dB, SSIM %.4f on %d images (EMA)", at_step, res["psnr"], res["ssim"],
                    res["num_images"])
        return res

    def save(at_step: int) -> None:
        if main:
            state = _state(cfg, tok_cfg, model, ema, opt, disc, disc_opt, lecam, at_step)
            state["train_seconds"] = train_s
            save_checkpoint(state, out / CHECKPOINT_NAME)

    def samples(at_step: int) -> None:
        nonlocal last_sample
        if not main:
            return
        last_sample = at_step
        with torch.no_grad():
            ema.eval()
            rec = ema(fixed.to(device)).reconstruction.float().clamp(-1, 1).cpu()  # (8, c, H, W)
        scale = max(1, 96 // tok_cfg.resolution)
        path = save_image_grid(torch.cat([fixed, rec]), out / "samples" / f"recon_{at_step:07d}.png", nrow=8,
                               row_labels=["input", "recon"], scale=scale)
        copy_file_atomic(path, out / "reconstructions.png")

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="tokenizer", unit="step", disable=not (main and cfg.progress),
               dynamic_ncols=True)
    sums: dict[str, float] = {}
    n_since, train_s_logged = 0, train_s

    def log_row(lr: float) -> None:
        # averages since the last row; img/s over training-step time only (evals and saves excluded)
        nonlocal sums, n_since, train_s_logged
        row = {"step": step, **{k: round(v / n_since, 6) for k, v in sums.items()}, "lr": lr,
               "img_per_s": round(n_since * cfg.batch_size / max(train_s - train_s_logged, 1e-9), 1),
               "train_minutes": round(train_s / 60, 3)}
        log.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", l1=f"{row['l1']:.4f}")
        if not cfg.progress:
            logger.info("step %d: loss %.4f, l1 %.4f, %.0f img/s", step, row["loss"], row["l1"], row["img_per_s"])
        sums, n_since, train_s_logged = {}, 0, train_s
    model.train()
    gen = torch.Generator(device=device)  # the GAN decoder's noise: reseeded every step, so resume is exact
    interrupt = StepBoundaryInterrupt(info).install()
    try:
        while step < cfg.steps:
            if budget_s > 0 and _out_of_time(train_s, budget_s, info):
                logger.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
                break
            interrupt.begin_step()
            t_step = time.time()
            # with a time budget the schedule follows whichever of steps and clock is further along
            progress = max(step, int(cfg.steps * train_s / budget_s)) if budget_s > 0 else step
            lr = cosine_lr(progress, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            images, _ = next(batches)
            images = images.to(device, non_blocking=True)  # (b, c, H, W)
            train_disc = disc is not None and step >= cfg.disc_start
            use_gan = train_disc and step >= cfg.disc_start + cfg.disc_warmup  # the decoder feels the GAN

            with autocast(device, cfg.dtype):
                out_t = net(images, generator=gen.manual_seed(step_seed(cfg.seed, info, step)))
            rec = out_t.reconstruction.float()  # (b, c, H, W)
            q = out_t.quant
            terms = {"l1": (rec - images).abs().mean(), "entropy": q.entropy_loss.float(),
                     "commit": q.commitment.float(), "codebook": q.codebook_loss.float()}
            loss = terms["l1"] + cfg.entropy_weight * terms["entropy"] + cfg.commit_weight * terms["commit"] \
                + terms["codebook"]
            if lpips is not None:
                with autocast(device, cfg.dtype):
                    terms["lpips"] = lpips(rec, images).float().mean()
                loss = loss + cfg.lpips_weight * terms["lpips"]
            if use_gan:
                disc.requires_grad_(False)  # the generator step must not touch (or sync) the discriminator
                with autocast(device, cfg.dtype):
                    terms["g_loss"] = generator_loss(disc(rec).float(), cfg.gen_loss)
                disc.requires_grad_(True)
                loss = loss + cfg.disc_weight * terms["g_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else 1e12)
            checked = {"loss": loss, "gradient_norm": grad_norm}
            if train_disc:  # its gradients too, before either update (D sees rec.detach(): G's step cannot matter)
                for group in disc_opt.param_groups:
                    group["lr"] = disc_lr * lr / cfg.lr
                with autocast(device, cfg.dtype):
                    logits = dnet(torch.cat([images, rec.detach()])).float()  # real and fake in one pass
                real, fake = logits.chunk(2)
                d_loss = hinge_d_loss(real, fake)
                terms["lecam"] = lecam(real, fake)
                terms["d_loss"] = d_loss
                d_total = d_loss + cfg.lecam_weight * terms["lecam"]
                disc_opt.zero_grad(set_to_none=True)
                d_total.backward()
                checked.update(discriminator_loss=d_total,
                               discriminator_gradient_norm=nn.utils.get_total_norm(
                                   [p.grad for p in disc.parameters() if p.grad is not None]))
            check_finite(step + 1, info, **checked)
            opt.step()
            update_ema(ema, model, ema_decay_at(cfg.ema_decay, step))
            if train_disc:
                disc_opt.step()

            step += 1
            n_since += 1
            train_s += time.time() - t_step
            terms.update(loss=loss, grad_norm=grad_norm, perplexity=q.perplexity, usage=q.usage)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log_row(lr)
            interrupt.end_step()  # a Ctrl-C during the update stops here, with the state whole and logged
            saving = step % cfg.save_every == 0 and step < cfg.steps
            sampling = cfg.sample_every and step % cfg.sample_every == 0
            evaluating = cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps
            if saving or sampling or evaluating:
                with interrupt.deferred():
                    if saving:
                        save(step)
                    if sampling:
                        samples(step)
                    if evaluating and main:  # eval_set is open on rank 0 only
                        evaluate(step)
                        log.plot(out)
            barrier(info)
    except KeyboardInterrupt:
        interrupt.save_on_interrupt(save, step, logger)
        raise
    finally:
        interrupt.restore()
        bar.close()

    if n_since:  # a time budget ended the run between log rows
        log_row(lr)
    save(step)
    logger.info("trained %d steps in %.1f min", step, train_s / 60)
    if main:
        if last_sample != step:
            samples(step)
        # exported before the final evaluation: an error there must not cost the trained model
        export = ema if cfg.export_ema else model
        export.save_pretrained(out / "model")
        logger.info("exported %s weights to %s", "EMA" if cfg.export_ema else "raw", out / "model")
        if eval_set is not None:
            evaluate(step)
        log.plot(out)
    barrier(info)
    return out / "model"


def _check_options(cfg: TokenizerTrainConfig) -> None:
    """Refuse values that would fail deep inside the loop, and flags that would be silently ignored."""
    if cfg.lr <= 0:  # 0 divides by zero in the discriminator's lr; < 0 is refused by AdamW mid-setup
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.disc_lr is not None and cfg.disc_lr <= 0:  # 0 would silently fall back to --lr
        raise UserError(f"--disc-lr must be > 0 (leave it out to use --lr), got {cfg.disc_lr}")
    if min(cfg.disc_start, cfg.disc_warmup) < 0:
        raise UserError("--disc-start and --disc-warmup must be at least 0")
    if min(cfg.lpips_weight, cfg.disc_weight) < 0:
        raise UserError("--lpips-weight and --disc-weight must be at least 0 (0: off)")
    if cfg.eval_images < 0:
        raise UserError(f"--eval-images must be at least 0 (0: no evaluation), got {cfg.eval_images}")
    if cfg.lpips_weight > 0 and not cfg.lpips_weights:
        raise UserError("--lpips-weight > 0 needs --lpips-weights PATH (a local file; nothing is downloaded)")
    if cfg.lpips_weights and cfg.lpips_weight == 0:
        raise UserError("--lpips-weights has no effect with --lpips-weight 0: give the LPIPS weight too")
    # a value away from its default was asked for; with its switch off it would do nothing, without a word
    if cfg.disc_weight == 0:
        _refuse_changed(cfg, ("disc_start", "disc_warmup", "disc_lr", "lecam_weight", "gen_loss"), "--disc-weight 0")
    if cfg.eval_images == 0:
        _refuse_changed(cfg, ("eval_every", "eval_split"), "--eval-images 0")


def _refuse_changed(cfg: TokenizerTrainConfig, names: tuple[str, ...], switch: str) -> None:
    defaults = TokenizerTrainConfig()
    changed = [f"--{n.replace('_', '-')}" for n in names if getattr(cfg, n) != getattr(defaults, n)]
    if changed:
        raise UserError(f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect with {switch}")


def _out_of_time(train_s: float, budget_s: float, info) -> bool:
    """Rank 0's clock decides, so that every rank stops at the same step."""
    flag = torch.tensor(1.0 if train_s >= budget_s else 0.0, device=info.device)
    if info.enabled:
        dist.broadcast(flag, src=0)  # in place: a .to(device) copy would be filled and dropped on CUDA
    return bool(flag.item())


def _state(cfg, tok_cfg, model, ema, opt, disc, disc_opt, lecam, step: int) -> dict:
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "config": asdict(cfg), "tokenizer_config": asdict(tok_cfg)}
    if disc is not None:
        state.update(disc=disc.state_dict(), disc_optimizer=disc_opt.state_dict(), lecam=lecam.state_dict())
    return state


def _restore(path: Path, tok_cfg, model, ema, opt, disc, disc_opt, lecam) -> tuple[int, float]:
    """Load a training checkpoint into the given modules; returns (step, training seconds so far)."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"{path} is not a bitdance tokenizer training checkpoint")
    diff = changed_fields(state.get("tokenizer_config", {}), tok_cfg)
    if diff:
        raise UserError(f"{path} was trained with another tokenizer config ({', '.join(diff)} differ); "
                        "use a new --out folder or the same --preset/--quantizer")
    if disc is None and "disc" in state:  # going on without it would drop it from the next checkpoint
        raise UserError(f"{path} was trained with a discriminator: resume it with --disc-weight > 0")
    if disc is not None and "disc" not in state:
        raise UserError(f"{path} has no discriminator state; it was trained with --disc-weight 0")
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
            lecam.load_state_dict(state["lecam"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not match this model: {first_line(e)}")
    return int(state["step"]), float(state.get("train_seconds", 0.0))

