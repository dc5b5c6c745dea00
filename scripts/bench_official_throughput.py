"""Sampling throughput (images/s) of the official ImageNet architectures at 256x256, random weights.

Times one batch of class-conditional generation per model: KV-cached next-patch sampling with CFG (the official
linear schedule and scale) and `--head-steps` flow steps per AR step, then (unless --no-decode) the d16c32
tokenizer's decoder. Values do not change the work done, so random weights give the released models' speed.

    # on a GPU (what the paper's table measures: B-4x 24.18 img/s, B-16x 90.26 img/s; hardware not stated)
    python scripts/bench_official_throughput.py --batch-size 256 --dtype bfloat16
    # a CPU smoke run (bf16 is ~100x slower on CPUs without bf16 units)
    python scripts/bench_official_throughput.py --device cpu --dtype float32 --batch-size 1 \\
        --head-steps 2 --warmup 0 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bitdance.models.autoencoder import TOKENIZER_PRESETS, ImageTokenizer
from bitdance.models.transformer import BITDANCE_PRESETS, BitDance
from bitdance.official import OFFICIAL_MODELS
from bitdance.sampling import generate
from bitdance.utils import autocast, count_parameters, resolve_device, write_json

PAPER_IMG_PER_S = {"B-1x": "~11 (figure)", "B-4x": 24.18, "B-16x": 90.26}  # ref §7.1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch(model, tokenizer, labels, head_steps, dtype, device, decode: bool, seed: int):
    """Seconds for (token generation, decoding) of one batch."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad(), autocast(device, dtype):
        sync(device)
        t0 = time.perf_counter()
        codes = generate(model, labels, num_steps=head_steps, generator=gen, progress=False)  # (b, k, h, w)
        sync(device)
        t1 = time.perf_counter()
        if decode:
            tokenizer.decode(codes)
            sync(device)
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["B-1x", "B-4x", "B-16x"], choices=list(OFFICIAL_MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--head-steps", type=int, default=100, help="flow steps per AR step (official: 100)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (CUDA kernels, allocator)")
    p.add_argument("--no-decode", action="store_true", help="time token generation only")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (1 on a busy shared CPU)")
    p.add_argument("--out", default="runs/bench_official/throughput.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    torch.manual_seed(0)
    tokenizer = None if args.no_decode else ImageTokenizer(TOKENIZER_PRESETS["d16c32"]()).to(device).eval()
    labels = torch.arange(args.batch_size, device=device) % 1000  # (b,)
    rows = []
    for name in args.models:
        m = OFFICIAL_MODELS[name]
        model = BitDance(BITDANCE_PRESETS[m.size](parallel=m.parallel)).to(device).eval()  # official cfg preset
        for i in range(args.warmup):
            time_batch(model, tokenizer, labels, args.head_steps, args.dtype, device, not args.no_decode, i)
        gen_s, dec_s = time_batch(model, tokenizer, labels, args.head_steps, args.dtype, device,
                                  not args.no_decode, 1234)
        total = gen_s + dec_s
        row = {"model": name, "params_M": round(count_parameters(model) / 1e6, 1),
               "ar_steps": model.config.num_steps, "cfg_scale": model.config.cfg_scale,
               "generate_s": round(gen_s, 3), "decode_s": round(dec_s, 3),
               "images_per_s": round(args.batch_size / total, 3),
               "images_per_s_tokens_only": round(args.batch_size / gen_s, 3),
               "paper_images_per_s": PAPER_IMG_PER_S.get(name)}
        rows.append(row)
        print(f"{name:6s} {row['params_M']:7.1f}M  {row['ar_steps']:3d} AR steps  "
              f"{row['images_per_s']:9.3f} img/s (tokens only {row['images_per_s_tokens_only']:.3f}; "
              f"paper {row['paper_images_per_s']})", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "dtype": args.dtype, "batch_size": args.batch_size, "head_steps": args.head_steps,
              "decode": not args.no_decode, "torch": torch.__version__, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from bitdance.cli import report_errors

    raise SystemExit(report_errors(main, Path(__file__).name))
