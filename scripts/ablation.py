#!/usr/bin/env python
"""The paper's two ablations at Fashion-MNIST scale: token head and tokens per AR step, at one training budget.

Trains the `fmnist` generator preset once per variant with `bitdance train` (same tokenizer, token cache,
steps, batch, learning rate and seed), then scores each with scripts/eval_generator.py (FID against the test
split, class consistency, images/s) and draws the speed/quality plot OUT/ablation.png.

    diffusion-1x / diffusion-4x / diffusion-16x   binary diffusion head, 1, 4 or 16 tokens per AR step
    bitwise-4x                                    per-bit classification head, 4 tokens per AR step

    python scripts/ablation.py --tokenizer runs/tok/model --device cuda --jobs 4   # GPU: all runs at once
    python scripts/ablation.py --tokenizer src/bitdance/builtin/tokenizer --train-steps 1400 --train-batch-size 32
    python scripts/ablation.py --tokenizer T --device cuda --variants diffusion-4x --model-arg dim=384 --out runs/wide
    python scripts/ablation.py --plot-only --out runs/ablation --speed runs/bench_sampling*/bench_sampling.json

A variant whose OUT/NAME/model exists is not retrained; one with a checkpoint resumes (both only with the
settings recorded in OUT/NAME/train_command.json). Ctrl-C stops the runs after they saved; rerun to go on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizer import stop_runs  # noqa: E402
from eval_generator import add_eval_args, bitdance_cmd, check_eval_inputs, evaluate, format_rows  # noqa: E402

VARIANTS = {  # name -> (head, tokens per AR step)
    "diffusion-1x": ("diffusion", 1),
    "diffusion-4x": ("diffusion", 4),
    "diffusion-16x": ("diffusion", 16),
    "bitwise-4x": ("bitwise", 4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenizer", default="src/bitdance/builtin/tokenizer", help="trained tokenizer folder")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--train-steps", type=int, default=4000)
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--model-arg", action="append", default=[], metavar="FIELD=VALUE",
                   help="a BitDanceConfig field over the fmnist preset for every variant, repeatable (e.g. dim=384)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once (GPU: all; CPU: 1)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/results.json")
    p.add_argument("--speed", nargs="+", default=None, metavar="JSON",
                   help="bench_sampling.json files: plot their images/s (timed alone) instead of the evaluation's")
    add_eval_args(p)
    return p.parse_args(argv)


def train_settings(args, name: str) -> list[str]:
    """The `bitdance train` arguments that decide the variant's model (not where it is written or run)."""
    head, parallel = VARIANTS[name]
    cmd = [
        "train", "--tokenizer", args.tokenizer, "--data", args.data, "--preset", "fmnist", "--parallel",
        str(parallel), "--head", head, "--steps", str(args.train_steps), "--batch-size", str(args.train_batch_size),
        "--lr", str(args.lr), "--warmup", str(args.warmup), "--save-every", "1000", "--sample-every", "0",
        "--no-progress",
    ]
    for field_value in args.model_arg:
        cmd += ["--model-arg", field_value]
    return cmd


def train_command(args, name: str) -> list[str]:
    cmd = bitdance_cmd() + train_settings(args, name) + [
        "--token-cache", str(Path(args.out) / "tokens.safetensors"), "--out", str(Path(args.out) / name)]
    return cmd + (["--device", args.device] if args.device else [])


def train_all(args) -> dict[str, float]:
    """Train the variants (args.jobs at a time); returns each one's wall time in seconds."""
    from bitdance.data import encode_dataset, load_dataset
    from bitdance.train import load_tokenizer
    from bitdance.utils import resolve_device, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in args.variants if not trained_before(args, n)]
    for name in todo:  # a run that resumes its checkpoint goes on with the settings it started with
        if (out / name / "checkpoint.pt").is_file():
            same_settings(args, name, "a checkpoint")
    device = resolve_device(args.device)
    tok = load_tokenizer(args.tokenizer, device)  # one shared token cache, written before the runs start
    data = load_dataset(args.data, tok.config.resolution, tok.config.in_channels, split="train")
    encode_dataset(tok, data, 256, device, out / "tokens.safetensors")

    running: dict[str, tuple[subprocess.Popen, float]] = {}
    walls: dict[str, float] = {}
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                name = todo.pop(0)
                (out / name).mkdir(exist_ok=True)
                cmd = train_command(args, name)
                write_json(train_settings(args, name), out / name / COMMAND_FILE)
                print("$", " ".join(cmd), flush=True)
                with open(out / name / "train.out", "a") as log:  # the child keeps its own copy of the handle
                    running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                                     time.perf_counter())
            time.sleep(2)
            for name, (proc, start) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    if proc.returncode != 0:
                        raise SystemExit(f"{name}: training failed (exit {proc.returncode}); "
                                         f"see {out / name}/train.out")
                    walls[name] = time.perf_counter() - start
                    print(f"{name}: trained in {walls[name] / 60:.1f} min", flush=True)
    except BaseException as e:  # a failure (or Ctrl-C) must not leave the other runs holding the machine
        stop_runs([proc for proc, _ in running.values()], interrupted=isinstance(e, KeyboardInterrupt))
        raise
    return walls


COMMAND_FILE = "train_command.json"


def trained_before(args, name: str) -> bool:
    """True if OUT/NAME holds a finished model trained by this same command (it is reused); a finished model of
    other settings is refused rather than silently scored as if it were this run's."""
    folder = Path(args.out) / name
    if not (folder / "model" / "model_index.json").is_file():
        return False
    recorded = same_settings(args, name, "a model")
    print(f"{name}: reusing the model in {folder}" + ("" if recorded else " (trained before commands were recorded)"),
          flush=True)
    return True


def same_settings(args, name: str, what: str) -> bool:
    """Refuse OUT/NAME when its recorded training settings are not this command's; False if it has no record."""
    from bitdance.utils import UserError, read_json

    folder = Path(args.out) / name
    if not (folder / COMMAND_FILE).is_file():
        return False
    if read_json(folder / COMMAND_FILE) != train_settings(args, name):
        raise UserError(f"{folder} holds {what} trained with other settings (see {folder / COMMAND_FILE}); "
                        "choose another --out, or delete it to train again")
    return True


def plot(rows: list[dict], path: Path, speed: dict | None = None) -> None:
    """FID vs images/s (one line per variant through its guidance scales) and class consistency per variant.

    `speed` (`load_speed`): images/s per (head, parallel) from scripts/bench_sampling.py (timed alone), with the
    device and batch they were timed at; without it the images/s measured while sampling the evaluation set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(dict.fromkeys(r["name"] for r in rows))
    cfgs = sorted({r["cfg"] for r in rows if r["cfg"] is not None})
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        head, parallel = VARIANTS.get(name, (None, None))
        rates = speed["img_per_s"] if speed else {}
        x = [rates.get((head, parallel), r["images_per_s"]) for r in mine]
        ax_fid.plot(x, [r["fid"] for r in mine], "o-", color=colors[name], label=name)
        for xi, r in zip(x, mine):
            if r["cfg"] is not None:
                ax_fid.annotate(f"cfg {r['cfg']:g}", (xi, r["fid"]), textcoords="offset points", xytext=(6, -3),
                                fontsize=7)
    if speed:  # the timing's own device and batch, not the evaluation's
        where = f"{speed['device_name']}, batch {speed['batch']}, alone, random weights"
    else:
        where = f"{rows[0]['device_name']}, batch {rows[0]['batch_size']}, while sampling the evaluation set"
    ax_fid.set(xscale="log", xlabel=f"images/s ({where})",
               ylabel=f"FID ({rows[0]['num_samples']} samples vs test split)", title="speed vs quality")
    ax_fid.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax_fid.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_fid.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_fid.grid(alpha=0.3, which="both")
    ax_fid.legend(fontsize=8)
    width = 0.8 / max(len(cfgs), 1)
    for j, cfg in enumerate(cfgs or [None]):
        vals = [100 * next((r["class_consistency"] for r in rows if r["name"] == n and r["cfg"] == cfg), 0)
                for n in names]
        ax_acc.bar([i + (j - (len(cfgs) - 1) / 2) * width for i in range(len(names))], vals, width=width,
                   label="model's cfg" if cfg is None else f"cfg {cfg:g}", alpha=0.5 + 0.5 * j / max(len(cfgs), 1))
    real = rows[0].get("classifier_real_accuracy")
    if real:
        ax_acc.axhline(100 * real, color="k", ls="--", lw=1,
                       label=f"classifier on real test images ({100 * real:.1f}%)")
    ax_acc.set_xticks(range(len(names)), names, rotation=15)
    ax_acc.set(ylabel="class consistency (%)", ylim=(50, 100), title="class conditioning")
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    from bitdance.utils import save_figure

    save_figure(fig, path, dpi=120)


def load_speed(paths: list[str]) -> dict:
    """Images/s per (head, parallel) at the largest batch of scripts/bench_sampling.py JSON files, all from one
    device (speeds from two machines on one axis would compare nothing)."""
    rates, devices, batch = {}, set(), None
    for path in paths:
        res = json.loads(Path(path).read_text())
        devices.add(res.get("device_name") or res.get("device"))
        if len(devices) > 1:
            raise SystemExit(f"--speed files come from different devices ({', '.join(map(str, devices))}); "
                             "pass one device's files")
        runs = [r for r in res["runs"] if r["cache"]]
        largest = max(r["batch"] for r in runs)
        batch = largest
        for r in runs:
            if r["batch"] == largest:
                rates[(res.get("head", "diffusion"), r["parallel"])] = r["img_per_s"]
    return {"img_per_s": rates, "device_name": devices.pop(), "batch": batch}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    from bitdance.utils import write_json

    if args.plot_only:
        rows = json.loads((out / "results.json").read_text())
    else:
        check_eval_inputs(args)  # a wrong --classifier or --data fails now, not after hours of training
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        walls = train_all(args)
        rows = []
        for name in args.variants:
            for row in evaluate(str(out / name / "model"), out / name / "eval", args, name=name):
                row["head"], row["parallel"] = VARIANTS[name]
                row["train_seconds"] = walls.get(name)  # None: trained by an earlier run of this script
                # what the model was trained with, from its run folder (a model kept from an earlier run of this
                # script may differ from today's flags)
                run_cfg = json.loads((out / name / "config.json").read_text())
                row["train"] = {k: run_cfg["train"].get(k) for k in ("steps", "batch_size", "lr", "tokenizer",
                                                                     "model_args")}
                row["train"]["model_config"] = run_cfg.get("model")
                rows.append(row)
        write_json(rows, out / "results.json")
    plot(rows, out / "ablation.png", load_speed(args.speed) if args.speed else None)
    print(format_rows(rows))
    print(f"plot: {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    from bitdance.cli import report_errors

    sys.exit(report_errors(main, Path(__file__).name))
