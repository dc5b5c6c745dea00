"""`bitdance tokenizer ...`: train, evaluate and try out image tokenizers.

    bitdance tokenizer train --data PATH --preset NAME --steps N --out DIR [--quantizer binary|vq] ...
    bitdance tokenizer train --data PATH --init-from builtin --decoder-only --disc-weight 0.3 --out DIR
    bitdance tokenizer eval [--model DIR] --data PATH [--split test] [--num-images N] --json
    bitdance tokenizer reconstruct [--model DIR] IMAGE... --out DIR

--model defaults to the built-in tokenizer.

Progress bars and logs go to stderr; stdout carries the result (one JSON object with --json).
"""

from __future__ import annotations

import json
from pathlib import Path

from bitdance.commands.options import (
    DEVICE_HELP,
    DefaultsHelpFormatter,
    add_optimisation_flags,
    add_run_flags,
    config_from_args,
    print_from_main_rank,
)
from bitdance.utils import UserError, ensure_output_dir

MODEL_HELP = "tokenizer folder, or a tokenizer/generator run or pipeline folder holding one (default: the built-in)"


def register(subparsers) -> None:
    from bitdance.models.autoencoder import TOKENIZER_PRESETS
    from bitdance.train_tokenizer import TokenizerTrainConfig

    d = TokenizerTrainConfig()
    p = subparsers.add_parser("tokenizer", help="train, evaluate and try image tokenizers (binary or VQ)")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="train a tokenizer (L1 + entropy + commitment [+ LPIPS] [+ GAN])",
                       formatter_class=DefaultsHelpFormatter)
    g = t.add_argument_group("data and model")
    g.add_argument("--data", required=True, help="image folder (class subfolders or flat) or a folder with the "
                   "Fashion-MNIST IDX .gz files; unreadable images are reported and skipped")
    g.add_argument("--preset", default=d.preset, choices=sorted(TOKENIZER_PRESETS), help="tokenizer architecture")
    g.add_argument("--quantizer", default=None, choices=("binary", "vq"),
                   help="bottleneck: binary sign bits or a product VQ with the same bits per token "
                   "(default: the preset's, binary)")
    g.add_argument("--group-size", type=int, default=None,
                   help="bits per entropy group / VQ sub-codebook (default: the preset's, 8)")
    g.add_argument("--out", required=True, help="run folder (checkpoint, logs, grids; final model in OUT/model)")
    g.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="start from a trained tokenizer (its folder, a run folder, a pipeline folder or 'builtin'); "
                   "its architecture replaces --preset")
    g.add_argument("--decoder-only", action="store_true",
                   help="with --init-from: train only the decoder. The codes stay bit-identical, so generators "
                   "trained on that tokenizer keep working with the new decoder (e.g. a GAN fine-tune)")
    g.add_argument("--gan-decoder", action="store_true",
                   help="the official noise-concat decoder (noise channels beside the codes). With --init-from a "
                   "plain decoder, it is widened so that it starts out decoding exactly as before")
    g = t.add_argument_group("optimisation")
    add_optimisation_flags(g, d)
    g.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="time budget: stop after this many minutes of training steps (evaluations excluded, "
                   "resumes included); the lr schedule then follows the clock when it is ahead of --steps (0: off)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a fraction of --lr")
    g.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    g = t.add_argument_group("losses")
    g.add_argument("--entropy-weight", type=float, default=d.entropy_weight, help="binary entropy loss weight")
    g.add_argument("--commit-weight", type=float, default=d.commit_weight, help="commitment loss weight")
    g.add_argument("--lpips-weight", type=float, default=d.lpips_weight, help="LPIPS weight (needs --lpips-weights)")
    g.add_argument("--lpips-weights", default=None, help="local LPIPS-VGG16 weights file (never downloaded; "
                   "for --lpips-weight > 0)")
    g.add_argument("--disc-weight", type=float, default=d.disc_weight,
                   help="GAN generator loss weight (0: no GAN; the other --disc-*, --lecam-weight and --gen-loss "
                   "flags need it)")
    g.add_argument("--disc-start", type=int, default=d.disc_start, help="step at which the GAN starts")
    g.add_argument("--disc-warmup", type=int, default=d.disc_warmup,
                   help="steps from --disc-start in which only the discriminator learns")
    g.add_argument("--disc-lr", type=float, default=None, help="discriminator lr (default: --lr)")
    g.add_argument("--lecam-weight", type=float, default=d.lecam_weight, help="LeCAM regulariser weight")
    g.add_argument("--gen-loss", default=d.gen_loss, choices=("non_saturating", "hinge"),
                   help="generator adversarial loss")
    g = t.add_argument_group("run")
    add_run_flags(g, d)
    g.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between reconstruction grids")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between test-split PSNR evaluations (0: only at the end)")
    g.add_argument("--eval-split", default=d.eval_split, help="split used for evaluation")
    g.add_argument("--eval-images", type=int, default=d.eval_images,
                   help="images per evaluation (0: no evaluation; then --eval-every and --eval-split are refused)")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="PSNR, SSIM, bit usage and code perplexity on a data split")
    e.add_argument("--model", default=None, help=MODEL_HELP)
    e.add_argument("--data", required=True, help="image folder or Fashion-MNIST IDX folder")
    e.add_argument("--split", default="test", help="split to evaluate (default: test)")
    e.add_argument("--num-images", type=int, default=None, help="evenly spaced images to use (default: all)")
    e.add_argument("--batch-size", type=int, default=100, help="images per forward pass (default: 100)")
    e.add_argument("--device", default=None, help=DEVICE_HELP)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--save-reconstructions", default=None, metavar="FILE.npz",
                   help="also write the reconstructions as an ADM-style .npz (score it with `bitdance eval fid "
                   "--samples FILE.npz` for the reconstruction FID)")
    e.set_defaults(func=run_eval)

    r = sub.add_parser("reconstruct", help="encode and decode images; write original | reconstruction PNGs")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    r.add_argument("--model", default=None, help=MODEL_HELP)
    r.add_argument("--out", required=True, help="output folder for <name>_recon.png files")
    r.add_argument("--scale", type=int, default=None, help="upscale factor of the PNGs (default: to ~128 px)")
    r.add_argument("--device", default=None, help=DEVICE_HELP)
    r.set_defaults(func=run_reconstruct)


# ----------------------------------------------------------------------------------------------
# Handlers
# ----------------------------------------------------------------------------------------------


def run_train(args) -> int:
    from bitdance.train_tokenizer import TokenizerTrainConfig, run

    print_from_main_rank(run(config_from_args(TokenizerTrainConfig, args)))
    return 0


def _load_model(model: str | None, device):
    from bitdance.models.autoencoder import ImageTokenizer
    from bitdance.pipeline import resolve_tokenizer_path
    from bitdance.utils import resolve_device

    path = resolve_tokenizer_path(model or "builtin")
    dev = resolve_device(device)
    return ImageTokenizer.from_pretrained(path, device=dev), dev, path


def run_eval(args) -> int:
    from bitdance.data import load_dataset
    from bitdance.metrics import evaluate_tokenizer

    if args.num_images is not None and args.num_images < 1:
        raise UserError("--num-images must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    tok, dev, path = _load_model(args.model, args.device)
    data = load_dataset(args.data, tok.config.resolution, tok.config.in_channels, split=args.split)
    if args.save_reconstructions:  # checked before the evaluation, not after it
        if not args.save_reconstructions.endswith(".npz"):
            raise UserError(f"--save-reconstructions must end in .npz, got {args.save_reconstructions}")
        ensure_output_dir(args.save_reconstructions)
    recons = [] if args.save_reconstructions else None
    res = evaluate_tokenizer(tok, data, args.num_images, args.batch_size, dev, progress=not args.json,
                             reconstructions=recons)
    res = {"model": str(path), "data": str(args.data), "split": args.split, **res,
           "skipped_images": data.skipped}
    if recons is not None:
        import numpy as np

        from bitdance.evaluation.npz import save_npz

        labels = None if recons[0][1] is None else np.concatenate([np.asarray(lab) for _, lab in recons])
        if labels is not None and (labels < 0).any():
            labels = None  # a flat folder has no classes (label -1); an .npz carries class ids or nothing
        save_npz(args.save_reconstructions, np.concatenate([img for img, _ in recons]), labels)
        res["reconstructions"] = args.save_reconstructions
    if args.json:
        print(json.dumps(res))
    else:
        print(f"tokenizer  {path} ({res['quantizer']}, {res['bits_per_token']} bits/token)")
        print(f"data       {args.data} [{args.split}], {res['num_images']} images")
        print(f"PSNR       {res['psnr']:.2f} dB")
        print(f"SSIM       {res['ssim']:.4f}")
        print(f"bit usage  {res['bit_usage']:.3f} (fraction of +1 bits)")
        print(f"perplexity {', '.join(f'{p:.1f}' for p in res['perplexity_per_group'])} "
              f"(per group of {res['bits_per_group']} bits, max {res['codebook_size_per_group']})")
    return 0


def run_reconstruct(args) -> int:
    import torch

    from bitdance.data import load_image
    from bitdance.utils import save_image_grid

    if args.scale is not None and args.scale < 1:  # 0 used to mean the default, < 0 a PIL traceback
        raise UserError(f"--scale must be at least 1 (leave it out for ~128 px), got {args.scale}")
    tok, dev, _ = _load_model(args.model, args.device)
    res, ch = tok.config.resolution, tok.config.in_channels
    images = [load_image(p, res, ch) for p in args.images]  # fails on the first bad file, naming it
    out = Path(args.out)
    scale = args.scale if args.scale is not None else max(1, 128 // res)
    seen: set[str] = set()
    with torch.no_grad():
        for i, (p, x) in enumerate(zip(args.images, images)):
            noise = torch.Generator(device=dev).manual_seed(0)  # a noise-concat decoder: the same picture each run
            rec = tok.decode(tok.encode(x[None].to(dev)), generator=noise).float().clamp(-1, 1).cpu()  # (1, c, H, W)
            name = Path(p).stem if Path(p).stem not in seen else f"{Path(p).stem}_{i}"
            seen.add(name)
            dest = save_image_grid(torch.cat([x[None], rec]), out / f"{name}_recon.png", nrow=2, scale=scale)
            print(dest)
    return 0
