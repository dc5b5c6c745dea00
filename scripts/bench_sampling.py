"""Sampling speed of next-patch decoding: parallel 1x / 4x / 16x at equal head (flow) steps, KV cache on and off.

One small model (the `fmnist` preset: 8x8 grid of 32-bit tokens, so 64 / 16 / 4 AR steps) at random init (speed
does not depend on the weights). For each batch size and parallel we time
`sampling.generate` (tokens only; decoding is the same for every setting and is timed once), split the time into
head vs backbone, count FLOPs per image, and check that the cache-free path gives the same tokens.

    python scripts/bench_sampling.py                       # ~90 s on a 2-core CPU
    python scripts/bench_sampling.py --batch-sizes 1 16 32 --head-steps 50 --threads 2 --out runs/bench_sampling
    python scripts/bench_sampling.py --device cuda --batch-sizes 1 500 --out runs/bench_sampling_gpu
    python scripts/bench_sampling.py --head bitwise --parallel 4 --out runs/bench_sampling_bitwise

Writes OUT/bench_sampling.json and OUT/bench_sampling.png (bar chart of images/s).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bitdance.models.autoencoder import TOKENIZER_PRESETS, ImageTokenizer
from bitdance.models.transformer import BITDANCE_PRESETS, BitDance
from bitdance.sampling import generate
from bitdance.utils import UserError, save_figure, write_json


def build(parallel: int, head: str = "diffusion", seed: int = 0, device="cpu") -> BitDance:
    """fmnist preset at random init; the head's zero-initialised output layers get small random weights so that
    samples depend on the condition (timing is the same either way, the cache check is not)."""
    torch.manual_seed(seed)
    model = BitDance(BITDANCE_PRESETS["fmnist"](parallel=parallel, head=head)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Split:
    """Wall time inside head.sample vs the backbone (prefill / decode_step / prefix_conditions), head net calls."""

    def __init__(self, model: BitDance):
        self.t = {"head": 0.0, "backbone": 0.0}
        self.calls = 0
        self.model = model
        self.device = next(model.parameters()).device
        self._orig = {}
        for name, key in (("sample", "head"),):
            self._wrap(model.head, name, key)
        for name in ("prefill", "decode_step", "prefix_conditions"):
            self._wrap(model, name, "backbone")
        # one network evaluation of the head: forward_net (diffusion head, once per flow step), or the logits layer
        # (bitwise head, once per AR step); neither head's sample goes through a module's forward
        obj, name = (model.head, "forward_net") if hasattr(model.head, "forward_net") else (model.head, "logits")
        fn = getattr(obj, name)

        def counted(*a, **k):
            self.calls += 1
            return fn(*a, **k)

        self._orig[(obj, name)] = fn
        setattr(obj, name, counted)

    def _wrap(self, obj, name, key):
        fn = getattr(obj, name)
        self._orig[(obj, name)] = fn

        def timed(*a, **k):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(self.device)  # GPU: a sync per call, so run_timed takes the speed from a run without the split
            self.t[key] += time.perf_counter() - t0
            return out

        setattr(obj, name, timed)

    def restore(self):
        for (obj, name), _ in self._orig.items():
            delattr(obj, name)  # drop the instance attribute; the class method shows through again


def run_timed(model, labels, head_steps, use_cache, seed=0):
    """(codes, seconds, Split). On a CPU one run gives both (the split costs nothing there); on a GPU the split's
    syncs would slow the timed run, so the time comes from a run without them and the split from a second run."""
    on_cpu = labels.device.type == "cpu"
    codes, dt, split = run_once(model, labels, head_steps, use_cache, seed=seed, split=on_cpu)
    if not on_cpu:
        split = run_once(model, labels, head_steps, use_cache, seed=seed, split=True)[2]
    return codes, dt, split


def run_once(model, labels, head_steps, use_cache, seed=0, split=False):
    device = labels.device
    s = Split(model) if split else None
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():  # as BitDancePipeline samples
        codes = generate(model, labels, num_steps=head_steps, use_cache=use_cache, progress=False,
                         generator=torch.Generator(device=device).manual_seed(seed))
    sync(device)
    dt = time.perf_counter() - t0
    if s is not None:
        s.restore()
    return codes, dt, s


def flops_per_image(model, head_steps) -> dict:
    """FLOPs of sampling one image (CFG on), head vs backbone, counted at the benchmark's head steps.

    The head's share is counted by a second counter around `head.sample` (nested counters both see its ops), so a
    head that ignores the step count (the bitwise one) is counted as it runs, not extrapolated from step counts."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    head_sample, head_flops = model.head.sample, []

    def counted_sample(*args, **kwargs):
        with FlopCounterMode(display=False) as inner:
            out = head_sample(*args, **kwargs)
        head_flops.append(inner.get_total_flops())
        return out

    model.head.sample = counted_sample
    try:
        with FlopCounterMode(display=False) as fc:
            generate(model, torch.zeros(1, dtype=torch.long, device=device), num_steps=head_steps,
                     generator=torch.Generator(device=device).manual_seed(0), progress=False)
    finally:
        del model.head.sample  # the class method shows through again
    total, head = fc.get_total_flops(), sum(head_flops)
    return {"total_gflop": total / 1e9, "head_gflop": head / 1e9, "backbone_gflop": (total - head) / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="images per generate() call")
    ap.add_argument("--head-steps", type=int, default=25, help="flow steps per AR step (equal for every P)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting, round robin (fastest kept)")
    ap.add_argument("--no-cache-free", dest="cache_free", action="store_false", help="skip the cache-free runs")
    ap.add_argument("--cache-free-batch", type=int, default=None,
                    help="batch size for the cache-free runs, one of --batch-sizes (default: the largest)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy "
                    "2-core machine: spinning threads cost more than they give on these small matmuls)")
    ap.add_argument("--head", default="diffusion", choices=("diffusion", "bitwise"), help="token head")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda (on a GPU the head/backbone split comes from a second, untimed run)")
    ap.add_argument("--out", default="runs/bench_sampling")
    args = ap.parse_args(argv)
    if args.cache_free_batch is not None and args.cache_free_batch not in args.batch_sizes:
        # the cache-free run is compared with the cached one at the same batch, which only --batch-sizes times
        raise UserError(f"--cache-free-batch {args.cache_free_batch} must be one of --batch-sizes "
                        f"({' '.join(map(str, args.batch_sizes))})")
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cf_batch = args.cache_free_batch or max(args.batch_sizes)
    res = {"preset": "fmnist", "grid": [8, 8], "token_bits": 32, "head": args.head, "head_steps": args.head_steps,
           "cfg": "on", "threads": args.threads, "torch": torch.__version__, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "runs": []}
    t_start = time.time()

    tok = ImageTokenizer(TOKENIZER_PRESETS["fmnist"]()).eval().to(device)
    with torch.no_grad():
        codes = torch.where(torch.randn(16, 32, 8, 8, device=device) > 0, 1.0, -1.0)
        tok.decode(codes[:1])
        sync(device)
        t0 = time.perf_counter()
        tok.decode(codes)
        sync(device)
        res["decode_16_images_s"] = round(time.perf_counter() - t0, 4)

    models, flops = {}, {}
    for p in args.parallel:
        models[p] = build(p, args.head, device=device)
        flops[p] = flops_per_image(models[p], args.head_steps)
        with torch.inference_mode():  # warm-up
            generate(models[p], torch.zeros(2, dtype=torch.long, device=device), num_steps=2, progress=False)

    for b in args.batch_sizes:
        # round robin over P, repeated: a machine whose load drifts during the run biases no setting
        best, first_codes = {}, {}
        for r in range(args.repeats):
            for p in args.parallel:
                labels = torch.arange(b, device=device) % models[p].config.num_classes
                codes, dt, split = run_timed(models[p], labels, args.head_steps, True, seed=r)
                first_codes.setdefault(p, codes)
                if p not in best or dt < best[p][0]:
                    best[p] = (dt, split)
        for p in args.parallel:
            model, fl, (dt, split) = models[p], flops[p], best[p]
            row = {"parallel": p, "ar_steps": model.config.num_steps, "batch": b, "cache": True,
                   "seconds": round(dt, 3), "img_per_s": round(b / dt, 3),
                   "head_s": round(split.t["head"], 3), "backbone_s": round(split.t["backbone"], 3),
                   "head_net_calls": split.calls,
                   "ms_per_head_call": round(1000 * split.t["head"] / max(split.calls, 1), 3),
                   "head_gflop_per_s": round(fl["head_gflop"] * b / split.t["head"], 2),
                   **{k: round(v, 3) for k, v in fl.items()}}
            print(f"P={p:2d} batch={b:3d} cached    {row['img_per_s']:8.2f} img/s  ({dt:6.2f} s; head "
                  f"{row['head_s']:.2f} s = {split.calls} calls x {row['ms_per_head_call']:.2f} ms at "
                  f"{row['head_gflop_per_s']:.1f} GFLOP/s, backbone {row['backbone_s']:.2f} s; "
                  f"{fl['total_gflop']:.2f} GFLOP/img, head {fl['head_gflop']:.2f})", flush=True)
            res["runs"].append(row)
        if not args.cache_free or b != cf_batch:
            continue
        for p in args.parallel:
            labels = torch.arange(b, device=device) % models[p].config.num_classes
            nc_codes, nc_dt, nc_split = run_timed(models[p], labels, args.head_steps, False, seed=0)
            same = (nc_codes == first_codes[p]).float().mean()  # same seed: both paths make the same draws
            res["runs"].append({"parallel": p, "ar_steps": models[p].config.num_steps, "batch": b, "cache": False,
                                "seconds": round(nc_dt, 3), "img_per_s": round(b / nc_dt, 3),
                                "head_s": round(nc_split.t["head"], 3),
                                "backbone_s": round(nc_split.t["backbone"], 3),
                                "same_tokens_as_cached": round(float(same), 6)})
            print(f"P={p:2d} batch={b:3d} cache-free {b / nc_dt:7.2f} img/s  ({nc_dt:6.2f} s; backbone "
                  f"{nc_split.t['backbone']:.2f} s); KV cache speed-up {nc_dt / best[p][0]:.2f}x; tokens equal "
                  f"to cached: {float(same):.4f}", flush=True)

    # ratios to 1x at the same batch size (cached)
    cached = {(r["parallel"], r["batch"]): r for r in res["runs"] if r["cache"]}
    print("\nspeed-up over 1x at equal head steps (cached):")
    for (p, b), r in sorted(cached.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if (1, b) in cached:
            r["speedup_vs_1x"] = round(r["img_per_s"] / cached[(1, b)]["img_per_s"], 2)
            print(f"  batch {b:3d}  P={p:2d}: {r['speedup_vs_1x']:5.2f}x  ({r['img_per_s']:.2f} img/s)")
    for r in res["runs"]:
        if not r["cache"] and (r["parallel"], r["batch"]) in cached:
            r["kv_cache_speedup"] = round(cached[(r["parallel"], r["batch"])]["img_per_s"] / r["img_per_s"], 2)
    res["load_average_after"] = os.getloadavg()
    res["wall_s"] = round(time.time() - t_start, 1)
    res["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    write_json(res, out / "bench_sampling.json")
    plot(res, out / "bench_sampling.png")
    print(f"\nwrote {out / 'bench_sampling.json'} and {out / 'bench_sampling.png'} ({res['wall_s']} s)")
    return 0


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in res["runs"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [r for r in res["runs"] if r["batch"] == b]
        ps = sorted({r["parallel"] for r in rows})
        xs = range(len(ps))
        for off, cache, color in ((-0.2, True, "tab:blue"), (0.2, False, "tab:orange")):
            vals = [next((r["img_per_s"] for r in rows if r["parallel"] == p and r["cache"] == cache), 0) for p in ps]
            if any(vals):
                bars = ax.bar([x + off for x in xs], vals, width=0.4, color=color,
                              label="KV cache" if cache else "cache-free")
                for bar, r in zip(bars, [next((r for r in rows if r["parallel"] == p and r["cache"] == cache), {})
                                         for p in ps]):
                    if r.get("speedup_vs_1x"):
                        ax.annotate(f"{r['speedup_vs_1x']:.1f}x", (bar.get_x() + bar.get_width() / 2,
                                    bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"{p}x" for p in ps])
        ax.set_title(f"batch {b}, {res['head_steps']} head steps")
        ax.set_ylabel("images / s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    where = f"CPU ({res['threads']} thread(s))" if res.get("device", "cpu") == "cpu" else res["device_name"]
    fig.suptitle(f"BitDance fmnist sampling ({res.get('head', 'diffusion')} head), {where}, CFG on")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    from bitdance.cli import report_errors

    sys.exit(report_errors(main, Path(__file__).name))
