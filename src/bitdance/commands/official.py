"""`bitdance convert-official` and `bitdance sample-ddp`: run the official BitDance ImageNet checkpoints.

    bitdance convert-official BitDance_B_4x.pt converted/B-4x --tokenizer ae_d16c32.pt
    bitdance sample --model converted/B-4x --class-label 207 --out dog.png      # official cfg/steps by default
    torchrun --standalone --nproc_per_node 8 -m bitdance.cli sample-ddp --model converted/B-4x \\
        --out samples/B-4x.npz --per-proc-batch-size 64 --dtype bfloat16       # 50 per class, ADM .npz
"""

from __future__ import annotations

import argparse

from bitdance.commands.options import DTYPES, TEMPERATURE_HELP


def register(subparsers) -> None:
    from bitdance.models.transformer import CFG_SCHEDULES
    from bitdance.official import OFFICIAL_MODELS

    c = subparsers.add_parser(
        "convert-official", help="convert an official BitDance ImageNet .pt into a pipeline folder",
        description="Reads an official BitDance_{B_1x,B_4x,B_16x,L_1x,H_1x}.pt (its 'ema' weights), infers the "
        "model from tensor shapes, loads it strictly and writes tokenizer/ + generator/ + model_index.json with "
        "the official sampling settings (CFG scale, linear schedule, 100 head steps) as defaults.")
    c.add_argument("src", help="official checkpoint, e.g. BitDance_B_4x.pt")
    c.add_argument("dst", help="output folder (pipeline layout)")
    c.add_argument("--tokenizer", default=None, help="official tokenizer: ae_d16c32.pt, ae.safetensors (+ "
                   "ae_config.json) or their folder (default: the checkpoint's own frozen vae.* weights)")
    c.add_argument("--model-name", choices=list(OFFICIAL_MODELS), default=None,
                   help="expected model; a checkpoint holding another one is refused")
    c.add_argument("--any-size", action="store_true",
                   help="accept a width other than B/L/H (a model you trained with the official code)")
    c.add_argument("--no-ema", action="store_true", help="use the 'model' weights instead of 'ema'")
    c.add_argument("--cfg-scale", type=float, default=None, help="override the stored default CFG scale")
    c.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None)
    c.add_argument("--num-steps", type=int, default=None, help="override the stored head sampling steps")
    c.add_argument("--force", action="store_true", help="overwrite an existing converted model in DST")
    c.set_defaults(func=run_convert)

    s = subparsers.add_parser(
        "sample-ddp", help="class-balanced samples (50 per class, label order) into an ADM .npz; torchrun-ready",
        description="Samples per-class images of every class in label order with a converted (or any) pipeline "
        "folder, one process or many under torchrun. Chunks are written atomically next to --out and a rerun "
        "skips finished ones; rank 0 merges them into --out (arr_0 uint8 NHWC, arr_1 labels).")
    s.add_argument("--model", required=True, help="pipeline folder (e.g. from convert-official)")
    s.add_argument("--out", required=True,
                   help="final .npz; chunks go to OUT with .npz replaced by .chunks (samples/B-4x.chunks/)")
    s.add_argument("--per-class", type=int, default=50, help="images per class (50: 50,000 for ImageNet)")
    s.add_argument("--num-classes", type=int, default=None, help="sample only classes 0..N-1 (default: all)")
    s.add_argument("--per-proc-batch-size", type=int, default=32, help="batch per process (= chunk size)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cfg-scale", type=float, default=None, help="default: the model's saved official setting")
    s.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None)
    s.add_argument("--num-steps", type=int, default=None, help="head sampling steps (default: saved, 100)")
    s.add_argument("--temperature", type=float, default=None, help=TEMPERATURE_HELP)
    s.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="autocast dtype; bfloat16 on GPU (the official setting), float32 on CPU")
    s.add_argument("--device", default=None, help="default: cuda (one GPU per local rank), else cpu")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_sample_ddp)


def run_convert(args: argparse.Namespace) -> int:
    from bitdance.official import convert_official, describe

    overrides = {"cfg_scale": args.cfg_scale, "cfg_schedule": args.cfg_schedule,
                 "num_sampling_steps": args.num_steps}
    summary = convert_official(args.src, args.dst, tokenizer=args.tokenizer, model_name=args.model_name,
                               any_size=args.any_size, use_ema=not args.no_ema, overrides=overrides,
                               force=args.force)
    print(f"{describe(summary)} -> {args.dst}")
    return 0


def run_sample_ddp(args: argparse.Namespace) -> int:
    from bitdance.official import SampleSetConfig, sample_class_balanced

    cfg = SampleSetConfig(model=args.model, out=args.out, per_class=args.per_class, num_classes=args.num_classes,
                          batch_size=args.per_proc_batch_size, seed=args.seed, cfg_scale=args.cfg_scale,
                          cfg_schedule=args.cfg_schedule, num_steps=args.num_steps, temperature=args.temperature,
                          dtype=args.dtype, device=args.device, progress=not args.no_progress)
    path = sample_class_balanced(cfg)
    if path is not None:
        print(f"wrote {path}")
    return 0
