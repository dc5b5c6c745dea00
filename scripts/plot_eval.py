#!/usr/bin/env python
"""Plot the speed/quality trade-off of scored sample sets: FID, class consistency and images/s per head steps.

Reads the rows that `scripts/eval_generator.py` writes (one or more results.json files) and draws one line per
guidance setting against the head (flow) steps; repeated settings (other seeds) show as separate points, so the
seed spread is visible. Rows whose images/s was not measured cleanly (null) are left out of that panel only.
`--x temperature` draws FID, class consistency and precision / recall against the sampling temperature instead
(rows without one count as 1, the default of every model we train); `--x cfg` against the guidance scale, one
line per row name (CFG and autoguidance with each guide model as separate lines; rows at the model's default
scale are left out).

    python scripts/plot_eval.py docs/data/builtin_v4_eval.json --title "built-in model, CPU" \
        --out docs/images/builtin_tradeoff.png
    python scripts/plot_eval.py docs/data/builtin_temperature_screen.json --x temperature \
        --out docs/images/builtin_temperature.png
    python scripts/plot_eval.py docs/data/builtin_autoguidance_screen.json --x cfg \
        --out docs/images/builtin_autoguidance.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def steps_of(row: dict) -> int | None:
    """The head steps a row was sampled with: asked for, or the model's own (recorded since it is resolved)."""
    settings = row.get("settings", {})
    return row.get("steps") or settings.get("num_inference_steps") or settings.get("head_steps")


def temperature_of(row: dict) -> float:
    return 1.0 if row.get("temperature") is None else row["temperature"]


def cfg_of(row: dict) -> float | None:
    return row.get("cfg")  # None: the model's default, whatever it was


AXES = {"steps": (steps_of, "head (flow) steps per AR step"), "temperature": (temperature_of, "sampling temperature"),
        "cfg": (cfg_of, "guidance scale (1 = none)")}


def series_name(row: dict, x: str = "steps") -> str:
    """The row's settings other than the x axis's, so that rows of other settings never share a line."""
    cfg = "model's" if row.get("cfg") is None else f"{row['cfg']:g}"
    schedule = row.get("cfg_schedule")
    # on the guidance axis the kind of guidance (the row's name says which guide) makes the line
    name = row["name"] if x == "cfg" else f"cfg {cfg}"
    name += f" ({schedule})" if schedule else ""
    if x != "temperature" and row.get("temperature") is not None:
        name += f", temperature {row['temperature']:g}"
    if x != "steps" and steps_of(row):
        name += f", {steps_of(row)} head steps"
    return name


def plot(rows: list[dict], path: Path, title: str = "", x: str = "steps") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    x_of, x_label = AXES[x]
    rows = [r for r in rows if x_of(r) is not None]
    if not rows:
        raise SystemExit(f"plot_eval.py: error: no row records its {x_label}")
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=x_of):
        groups.setdefault(series_name(r, x), []).append(r)
    # (keys drawn in one panel (dashed after the first), title, scale)
    last = (("images_per_s",), "images/s", 1) if x == "steps" else \
        (("precision", "recall"), "precision (solid) / recall (dashed)", 1)
    panels = ((("fid",), "FID (lower is better)", 1),
              (("class_consistency",), "class consistency % (higher is better)", 100), last)
    # constrained layout makes room for the legend below the panels, where it hides no data point
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8 + 0.2 * len(groups)), layout="constrained")
    for ax, (keys, name, scale) in zip(axes, panels):
        for (series, members), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for key, dash in zip(keys, ("-", "--")):
                points = [(x_of(r), r[key] * scale) for r in members if r.get(key) is not None]
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o" + dash if len(set(xs)) > 1 else "o", color=color,
                        label=series if key == keys[0] else None)
        if x == "steps":
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({x_of(r) for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(x_label)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].set_ylim(bottom=0)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    fig.suptitle(title, fontsize=11)
    from bitdance.utils import save_figure

    return save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of scripts/eval_generator.py")
    p.add_argument("--out", default="runs/eval/tradeoff.png")
    p.add_argument("--title", default="")
    p.add_argument("--x", default="steps", choices=sorted(AXES), help="what the x axis shows")
    args = p.parse_args(argv)
    rows = [row for f in args.results for row in json.loads(Path(f).read_text())]
    if not rows:
        raise SystemExit("plot_eval.py: error: no rows in " + ", ".join(args.results))
    print(plot(rows, Path(args.out), args.title, args.x))
    return 0


if __name__ == "__main__":
    from bitdance.cli import report_errors

    sys.exit(report_errors(main, Path(__file__).name))
