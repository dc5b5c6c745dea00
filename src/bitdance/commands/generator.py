"""`bitdance train` and `bitdance sample`: train a BitDance generator on a frozen tokenizer, sample from it.

    bitdance train --tokenizer DIR --data PATH --preset NAME --parallel P --head {diffusion,bitwise} \
        --steps N --out DIR [--batch-size B --lr LR --ema D --dtype T --compile ...]
    torchrun --standalone --nproc_per_node=N -m bitdance.cli train ...        # DDP (gloo on CPU)
    bitdance sample [--model DIR] [--class-label K ...] --num-images N --out FILE.png|FILE.npz

Progress bars and logs go to stderr; stdout carries the result (the path written).
"""

from __future__ import annotations

from pathlib import Path

from bitdance.commands.options import (
    DEVICE_HELP,
    DTYPES,
    TEMPERATURE_HELP,
    DefaultsHelpFormatter,
    add_guidance_flags,
    add_optimisation_flags,
    add_run_flags,
    config_from_args,
    key_value,
    print_from_main_rank,
)
from bitdance.utils import UserError


def register(subparsers) -> None:
    from bitdance.models.transformer import BITDANCE_PRESETS, CFG_SCHEDULES, PARALLEL_CHOICES
    from bitdance.train import TrainConfig

    d = TrainConfig()
    t = subparsers.add_parser("train", help="train a BitDance generator on a tokenizer's cached codes",
                              formatter_class=DefaultsHelpFormatter)
    g = t.add_argument_group("data and model")
    g.add_argument("--tokenizer", required=True, help="trained tokenizer folder (e.g. the model/ folder of "
                   "`bitdance tokenizer train`, or a pipeline folder)")
    g.add_argument("--data", required=True, help="image folder (class subfolders = classes; a flat folder trains "
                   "an unconditional model) or a folder with the Fashion-MNIST IDX .gz files")
    g.add_argument("--out", required=True, help="run folder (checkpoint, logs, sample grids; final pipeline in "
                   "OUT/model); an existing OUT/checkpoint.pt is resumed")
    g.add_argument("--preset", default=d.preset, choices=sorted(BITDANCE_PRESETS), help="backbone and head size")
    g.add_argument("--parallel", type=int, default=d.parallel, choices=PARALLEL_CHOICES,
                   help="tokens per AR step (a sqrt(P) x sqrt(P) patch)")
    g.add_argument("--head", default=d.head, choices=("diffusion", "bitwise"), help="token head")
    g.add_argument("--model-arg", dest="model_args", action="append", type=key_value, default=None,
                   metavar="FIELD=VALUE", help="any other BitDanceConfig field over the preset, repeatable "
                   "(e.g. --model-arg dim=384 --model-arg diff_batch_mul=4); saved with the model")
    g.add_argument("--class-dropout", type=float, default=None, help="label dropout for CFG (default: preset's)")
    g.add_argument("--perturb-rate", type=float, default=None, help="input bit-flip rate (default: preset's)")
    g.add_argument("--hflip", action="store_true", help="horizontal-flip augmentation (encodes the data twice)")
    g.add_argument("--token-cache", default=None, help="token cache file (default: OUT/tokens.safetensors)")
    g = t.add_argument_group("optimisation")
    add_optimisation_flags(g, d)
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    g.add_argument("--schedule-start", type=int, default=d.schedule_start,
                   help="step where warmup + cosine begin (to extend a finished run: its last step, with "
                   "a larger --steps; default 0 re-stretches the whole cosine)")
    g = t.add_argument_group("sampling defaults saved with the model")
    g.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="guidance scale (default: preset's)")
    g.add_argument("--cfg-schedule", default=None, choices=CFG_SCHEDULES,
                   help="guidance schedule over the AR steps (default: preset's)")
    g.add_argument("--sample-steps", dest="sampling_steps", type=int, default=None,
                   help="head (flow) steps per AR step (default: preset's)")
    g = t.add_argument_group("run")
    add_run_flags(g, d)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first step)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--sample-every", type=int, default=None,
                   help="steps between EMA sample grids (default: with every checkpoint; 0: never)")
    g.add_argument("--samples-per-class", type=int, default=d.samples_per_class, help="grid columns")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps in this run (schedule keeps --steps); rerun to continue")
    t.set_defaults(func=run_train)

    s = subparsers.add_parser("sample", help="sample images: a PNG grid (a row per class) or an ADM .npz")
    s.add_argument("--model", default="builtin", help="pipeline folder (OUT/model of `bitdance train`, or the "
                   "run folder) or 'builtin' (default)")
    s.add_argument("--class-label", nargs="+", default=None, metavar="K",
                   help="class ids or names (default: every class)")
    s.add_argument("--num-images", type=int, default=8, help="images per class label")
    s.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (arr_0 uint8 NHWC, arr_1 labels)")
    s.add_argument("--cfg", type=float, default=None,
                   help="guidance scale, of CFG or of the guide (default: the pipeline's for that kind; 1 = off)")
    s.add_argument("--cfg-schedule", default=None, choices=CFG_SCHEDULES,
                   help="guidance schedule over AR steps (default: the model's)")
    s.add_argument("--steps", type=int, default=None, help="head (flow) steps per AR step (default: the model's)")
    s.add_argument("--temperature", type=float, default=None, help=TEMPERATURE_HELP)
    add_guidance_flags(s)
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--batch-size", type=int, default=64, help="images per sampling batch")
    s.add_argument("--scale", type=int, default=None, help="PNG upscale factor (default: tiles to ~64 px)")
    s.add_argument("--rgb", action="store_true", help=".npz: repeat grey images to 3 channels (ADM evaluator)")
    s.add_argument("--device", default=None, help=DEVICE_HELP)
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="autocast dtype")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    s.set_defaults(func=run_sample)


# ----------------------------------------------------------------------------------------------
# Handlers
# ----------------------------------------------------------------------------------------------


def run_train(args) -> int:
    from bitdance.train import TrainConfig, run

    if args.model_args is not None:
        args.model_args = dict(args.model_args)
    print_from_main_rank(run(config_from_args(TrainConfig, args)))
    return 0


def run_sample(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from bitdance.flow import check_temperature
    from bitdance.pipeline import BitDancePipeline
    from bitdance.utils import batch_seed, ensure_output_dir, resolve_device, save_image_grid

    out = Path(args.out)
    kind = out.suffix.lower()
    if kind not in (".png", ".npz"):
        raise UserError(f"--out must end in .png (grid) or .npz (sample set), got {out.name}")
    for flag, given, applies_to in (("--rgb", args.rgb, ".npz"), ("--scale", args.scale is not None, ".png")):
        if given and kind != applies_to:
            raise UserError(f"{flag} has no effect with a {kind} --out (only with {applies_to})")
    if args.num_images < 1:
        raise UserError("--num-images must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.cfg is not None and args.cfg < 1:
        raise UserError(f"--cfg: the cfg scale must be >= 1 (1 turns guidance off), got {args.cfg}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.scale is not None and args.scale < 1:  # 0 used to mean the default, < 0 a PIL traceback after sampling
        raise UserError(f"--scale must be at least 1 (leave it out for ~64 px tiles), got {args.scale}")
    check_temperature(args.temperature)  # before the progress bars start
    ensure_output_dir(out)  # before sampling, not after
    device = resolve_device(args.device)
    pipe = BitDancePipeline.from_pretrained(args.model, device=device, dtype=args.dtype, guide_model=args.guide_model)
    pipe.guide_kind(args.guidance)  # refused before sampling
    classes = pipe.class_ids(args.class_label) if args.class_label else list(range(pipe.num_classes))
    labels = [c for c in classes for _ in range(args.num_images)]  # label order, num_images each

    images = []
    bar = tqdm(total=len(labels), desc="images", unit="img", disable=not args.progress)
    for start in range(0, len(labels), args.batch_size):
        gen = torch.Generator(device=device).manual_seed(batch_seed(args.seed, start))
        batch = pipe(class_labels=labels[start:start + args.batch_size], num_inference_steps=args.steps,
                     guidance_scale=args.cfg, cfg_schedule=args.cfg_schedule, generator=gen, output_type="pt",
                     progress=args.progress, temperature=args.temperature, guidance=args.guidance)
        images.append(batch.images)  # (b, c, H, W) in [-1, 1]
        bar.update(batch.images.shape[0])
    bar.close()
    images = torch.cat(images)

    if kind == ".npz":
        from bitdance.evaluation.npz import save_npz
        from bitdance.utils import to_uint8

        save_npz(out, to_uint8(images).numpy(), labels, rgb=args.rgb)
    else:
        scale = args.scale if args.scale is not None else max(1, 64 // images.shape[-1])
        save_image_grid(images, out, nrow=args.num_images, row_labels=[pipe.class_names[c] for c in classes],
                        scale=scale)
    print(out)
    return 0
