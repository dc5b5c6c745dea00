#!/usr/bin/env python
"""Fashion-MNIST tokenizer benchmark: binary vs VQ tokens at the same bits per token.

Trains the `fmnist` preset (32x32 grey -> 8x8 tokens of 32 bits) on the Fashion-MNIST train split with the
`bitdance tokenizer train` CLI, once with binary tokens and once with a product VQ (4 codebooks of 2^8 = 32
bits), each under the same CPU time budget, then evaluates PSNR / SSIM / bit usage / code perplexity on the
whole test split with `bitdance tokenizer eval --json`. Prints a table with the exact commands and wall
times and writes `OUT/results.json`. Target: binary PSNR >= 26 dB with at most 30 minutes of CPU training.

    python scripts/bench_tokenizer.py                      # both runs at once, one core each (~32 min)
    python scripts/bench_tokenizer.py --sequential         # one after the other, all cores each (~64 min)
    python scripts/bench_tokenizer.py --quantizers binary  # one run
    python scripts/bench_tokenizer.py --dry-run            # print the commands only

A run folder that already holds a checkpoint is resumed (the time budget counts across resumes); pass
--fresh to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TARGET_PSNR = 26.0


def bitdance_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("bitdance")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "bitdance.cli"]


def stop_runs(procs: list[subprocess.Popen], interrupted: bool, grace_s: float = 120.0) -> None:
    """Stop the training runs still going, each after it saved (our scripts' one way to end their trainers).

    The trainers stop on SIGINT at the end of their step and save a checkpoint; SIGTERM would kill them unsaved.
    After Ctrl-C they got the SIGINT already (a terminal signals the whole process group): wait for them. After
    a failure elsewhere, send it. Only a run still going after `grace_s`, or at a second Ctrl-C, is terminated.
    """
    alive = [p for p in procs if p.poll() is None]
    if not alive:
        return
    if not interrupted:
        for p in alive:
            p.send_signal(signal.SIGINT)
    print(f"waiting for {len(alive)} training run(s) to save (Ctrl-C again: stop them unsaved)", file=sys.stderr,
          flush=True)
    deadline = time.monotonic() + grace_s
    try:
        for p in alive:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # no run may be left holding the machine
        for p in alive:
            if p.poll() is None:
                p.terminate()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX folder")
    p.add_argument("--out", default="runs/bench_tokenizer", help="output folder (one run folder per quantizer)")
    p.add_argument("--quantizers", nargs="+", default=["binary", "vq"], choices=("binary", "vq"))
    p.add_argument("--max-minutes", type=float, default=29.0, help="training time budget per run")
    p.add_argument("--steps", type=int, default=15000, help="step cap (the time budget normally ends a run first)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=2000, help="in-training test PSNR (1000 images) every N steps")
    p.add_argument("--eval-images", type=int, default=None, help="test images for the final eval (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequential", action="store_true",
                   help="train one run after the other with all cores each (default: all runs at once, one thread "
                   "each; on a shared 2-core machine multi-threaded kernels slow down many times over)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the runs (default: 1, or torch's own with --sequential)")
    p.add_argument("--fresh", action="store_true", help="delete earlier run folders first")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def train_command(args, quantizer: str, run_dir: Path) -> list[str]:
    return bitdance_cmd() + [
        "tokenizer", "train", "--data", args.data, "--preset", "fmnist", "--quantizer", quantizer,
        "--steps", str(args.steps), "--max-minutes", str(args.max_minutes), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--warmup", str(args.warmup), "--eval-every", str(args.eval_every),
        "--eval-images", "1000", "--sample-every", "1000", "--save-every", "500", "--device", args.device,
        "--out", str(run_dir),
    ]


def eval_command(args, run_dir: Path) -> list[str]:
    cmd = bitdance_cmd() + ["tokenizer", "eval", "--model", str(run_dir / "model"), "--data", args.data,
                            "--split", "test", "--device", args.device, "--json"]
    if args.eval_images:
        cmd += ["--num-images", str(args.eval_images)]
    return cmd


def training_summary(run_dir: Path) -> dict:
    """Steps and training minutes from the run's loss log (the checkpoint holds the same)."""
    rows = [json.loads(x) for x in (run_dir / "losses.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "loss" in r]
    last = train[-1] if train else {}
    return {"steps": last.get("step"), "train_minutes": last.get("train_minutes"),
            "final_l1": last.get("l1"), "img_per_s": last.get("img_per_s"),
            "eval_curve": [(r["step"], round(r["eval_psnr"], 3)) for r in rows if "eval_psnr" in r]}


def main(argv=None) -> int:
    from bitdance.utils import write_json

    args = parse_args(argv)
    if args.threads is None:
        args.threads = 1 if not args.sequential else None
    out = Path(args.out)
    results_path = out / "results.json"
    results = {"target_psnr_db": TARGET_PSNR, "settings": vars(args), "runs": {}}
    if results_path.is_file():  # keep the other quantizers' rows (section 1 runs binary, then vq, into one folder)
        kept = json.loads(results_path.read_text()).get("runs", {})
        results["runs"] = {q: r for q, r in kept.items() if q not in args.quantizers}
    prefix = f"OMP_NUM_THREADS={args.threads} " if args.threads else ""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    cmds = {q: (train_command(args, q, out / q), eval_command(args, out / q)) for q in args.quantizers}
    for q, (tcmd, ecmd) in cmds.items():
        print(f"[{q}] train: {prefix}{shlex.join(tcmd)}\n[{q}] eval:  {prefix}{shlex.join(ecmd)}", flush=True)
    if args.dry_run:
        return 0
    for q in cmds:
        if args.fresh and (out / q).exists():
            shutil.rmtree(out / q)
        (out / q).mkdir(parents=True, exist_ok=True)

    # training: all runs at once (one core each, no thread contention) or one after the other
    walls: dict[str, float] = {}
    groups = [list(cmds)] if not args.sequential else [[q] for q in cmds]
    for group in groups:
        t0, procs = time.time(), {}
        for q in group:
            # bars would interleave; "a": a resumed run keeps the log of its earlier part
            log = (out / q / "train.out").open("a") if len(group) > 1 else None
            procs[q] = (subprocess.Popen(cmds[q][0], env=env, stdout=log, stderr=log), log)
            if log:
                print(f"[{q}] training, output in {out / q / 'train.out'}", flush=True)
        try:
            while any(q not in walls for q in group):
                for q, (proc, log) in procs.items():
                    if q in walls or proc.poll() is None:
                        continue
                    walls[q] = time.time() - t0  # when this run ended, not when the loop got to it
                    if log:
                        log.close()
                    if proc.returncode != 0:
                        raise SystemExit(f"[{q}] training failed (exit {proc.returncode}); see {out / q}")
                time.sleep(1)
        except BaseException as e:  # a failure (or Ctrl-C) must not leave the other run holding the machine
            stop_runs([proc for proc, _ in procs.values()], interrupted=isinstance(e, KeyboardInterrupt))
            raise

    for q, (tcmd, ecmd) in cmds.items():
        t0 = time.time()
        proc = subprocess.run(ecmd, check=True, stdout=subprocess.PIPE, text=True, env=env)
        eval_wall = time.time() - t0
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
        results["runs"][q] = {"train_command": prefix + shlex.join(tcmd), "eval_command": prefix + shlex.join(ecmd),
                              "train_wall_s": round(walls[q], 1), "eval_wall_s": round(eval_wall, 1),
                              "settings": vars(args), **training_summary(out / q), **metrics}
        write_json(results, results_path)  # after each eval: partial results survive

    print("\n| tokens | bits/token | steps | train min | train wall | test PSNR (dB) | SSIM | bit usage "
          "| perplexity / group |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q, r in results["runs"].items():
        perp = ", ".join(f"{p:.0f}" for p in r["perplexity_per_group"])
        print(f"| {q} | {r['bits_per_token']} | {r['steps']} | {r['train_minutes'] or 0:.1f} "
              f"| {r['train_wall_s']:.0f} s | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['bit_usage']:.3f} "
              f"| {perp} (of {r['codebook_size_per_group']}) |")
    for q, r in results["runs"].items():
        print(f"{q}: {r['train_command']}")
    if "binary" in results["runs"]:
        r = results["runs"]["binary"]
        ok = r["psnr"] >= TARGET_PSNR and r["train_minutes"] is not None and r["train_minutes"] <= 30.0
        results["binary_meets_target"] = ok
        write_json(results, results_path)
        print(f"binary target (PSNR >= {TARGET_PSNR} dB in <= 30 min of training): {'MET' if ok else 'NOT MET'} "
              f"({r['psnr']:.2f} dB, {r['train_minutes'] or 0:.1f} min)")
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    from bitdance.cli import report_errors

    sys.exit(report_errors(main, Path(__file__).name))
