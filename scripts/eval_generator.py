#!/usr/bin/env python
"""Score a class-conditional generator: FID against a data split, class consistency, and images/s.

For each guidance scale: sample N images (classes cycled, per-batch seeds; timed after one warm-up batch),
save them as an ADM-style .npz, then score that file with our CLI (`bitdance eval fid --samples` and
`bitdance eval classify --samples`). One row per guidance scale goes to OUT/results.json and a table is
printed. The same .npz can be re-scored later, or by the ADM evaluation suite.

    python scripts/eval_generator.py --model builtin --classifier runs/classifier --out runs/eval/builtin
    python scripts/eval_generator.py --model runs/gen/model --cfg 1.5 2 3 4 --num-samples 5000 --device cuda

Images/s is the sampler alone (tokens + decoding to pixels), at --batch-size, on --device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizer import bitdance_cmd  # noqa: E402  (the one way our scripts find the CLI)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from bitdance.commands.options import add_guidance_flags
    from bitdance.models.transformer import CFG_SCHEDULES

    p.add_argument("--data", default=FASHION_MNIST, help="reference data (FID) and real test split (classifier)")
    p.add_argument("--classifier", default="runs/classifier", help="folder of `bitdance eval train-classifier`")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="head (flow) steps (default: the model's)")
    p.add_argument("--cfg", type=float, nargs="+", default=[None], help="guidance scales (default: the model's)")
    p.add_argument("--cfg-schedule", default=None, choices=CFG_SCHEDULES,
                   help="guidance over the AR steps (default: the model's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="head sampling temperature (default: the model's; diffusion head: sampler noise scale)")
    add_guidance_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda (default: best available)")
    p.add_argument("--inception", default=None, help="TorchScript FID-Inception (default: the wheel's)")
    p.add_argument("--stats-cache", default="runs/fid_stats", help="cached reference statistics")


def check_eval_inputs(args) -> None:
    """The files the scoring reads, checked before sampling: otherwise a mistyped path fails only after it."""
    from bitdance.utils import CONFIG_NAME, WEIGHTS_NAME, UserError

    classifier = Path(args.classifier)
    if not (classifier / CONFIG_NAME).is_file() or not (classifier / WEIGHTS_NAME).is_file():
        raise UserError(f"--classifier {classifier} is not a trained classifier (needs {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME}); train one with `bitdance eval train-classifier --data DATA --out DIR`")
    if not Path(args.data).exists():
        raise UserError(f"--data {args.data} does not exist")
    if args.inception and not Path(args.inception).is_file():
        raise UserError(f"--inception {args.inception} is not a file")


def _run_json(cmd: list[str]) -> dict:
    print("  $", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def evaluate(model: str, out: Path, args, name: str | None = None) -> list[dict]:
    """Sample, then score, once per guidance scale in args.cfg. Returns the rows (also in out/results.json)."""
    import torch

    from bitdance.evaluation.npz import generate_samples, save_npz
    from bitdance.pipeline import BitDancePipeline, model_fingerprint
    from bitdance.utils import resolve_device, write_json

    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    # loaded once: the timing is sampling alone
    pipe = BitDancePipeline.from_pretrained(model, device=device, guide_model=args.guide_model)
    guidance = pipe.guide_kind(args.guidance)
    common = ["--device", str(device), "--json"]
    done_path = out / "results.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else []
    rows = []
    # a row is reused only if everything that decides its figures is the same: the files of the model, the data,
    # the classifier and the Inception network (a retrained one at the same path is new) and the device type
    common_key = {"model": model, "model_files": model_fingerprint(model), "steps": args.steps,
                  "cfg_schedule": args.cfg_schedule, "num_samples": args.num_samples, "seed": args.seed,
                  **({} if args.temperature is None else {"temperature": args.temperature}),  # old rows stay valid
                  **({} if guidance == "cfg" else {"guidance": guidance, "guide_model": args.guide_model,
                                                    "guide_files": guide_fingerprint(args.guide_model)}),
                  "batch_size": args.batch_size, "data": args.data, "classifier": args.classifier,
                  "inception": args.inception, "device": device.type,
                  "evaluator_files": evaluator_fingerprint(args)}
    for cfg in args.cfg:
        key = {**common_key, "cfg": cfg}
        same = [r for r in done if r.get("key") == key]
        if same:  # scored by an earlier run of this script: keep it
            rows.append(same[0])
            continue
        # files named by the sampling settings and a digest of the whole key, so another model or setting scored
        # into the same folder never overwrites them
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        tag = (f"cfg{'default' if cfg is None else f'{cfg:g}'}_steps{args.steps or 'default'}_"
               f"{args.cfg_schedule or 'default'}_{temperature_tag(args.temperature)}"
               f"{'' if guidance == 'cfg' else 'guide_'}"
               f"seed{args.seed}_n{args.num_samples}_{digest}")
        sample_kw = dict(num_inference_steps=args.steps, guidance_scale=cfg, cfg_schedule=args.cfg_schedule,
                         temperature=args.temperature, guidance=guidance, device=device)
        generate_samples(pipe, min(args.batch_size, 10), seed=args.seed + 1, progress=False, **sample_kw)  # warm-up
        start = time.perf_counter()  # the pipeline returns host arrays, so the GPU has finished when it returns
        images, labels, settings = generate_samples(pipe, args.num_samples, batch_size=args.batch_size,
                                                    seed=args.seed, **sample_kw)
        seconds = time.perf_counter() - start
        settings["model"] = model
        npz = out / f"samples_{tag}.npz"
        save_npz(npz, images, labels)
        fid_cmd = bitdance_cmd() + ["eval", "fid", "--samples", str(npz), "--data", args.data,
                                    "--stats-cache", args.stats_cache, "--out", str(out / f"fid_{tag}.json")]
        if args.inception:
            fid_cmd += ["--inception", args.inception]
        fid = _run_json(fid_cmd + common)
        cls = _run_json(bitdance_cmd() + ["eval", "classify", "--samples", str(npz), "--classifier", args.classifier,
                                          "--data", args.data] + common)
        rows.append({"name": name or model, "model": model, "cfg": cfg, "steps": args.steps,
                     "cfg_schedule": args.cfg_schedule, "temperature": args.temperature, "guidance": guidance,
                     "guide_model": args.guide_model,
                     "num_samples": args.num_samples, "fid": fid["fid"], "precision": fid["precision"],
                     "recall": fid["recall"], "num_reference": fid["num_reference"],
                     "class_consistency": cls["class_consistency"], "classifier_real_accuracy": cls["real_accuracy"],
                     "images_per_s": args.num_samples / seconds, "sampling_seconds": seconds,
                     "batch_size": args.batch_size, "device": str(device),
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "threads": torch.get_num_threads(), "samples": str(npz), "settings": settings, "key": key})
        print(format_rows(rows[-1:]), flush=True)
        kept = [r for r in done if r not in rows]  # other settings and models scored earlier
        write_json(rows + kept, done_path)
    return rows


def evaluator_fingerprint(args) -> str:
    """A cheap key (stat only) for the files that score a sample set: the reference split, the classifier and
    the Inception network (the wheel's when --inception is not given)."""
    from bitdance.data import data_fingerprint
    from bitdance.evaluation.fid import find_default_inception
    from bitdance.utils import files_fingerprint

    classifier = sorted(f for f in Path(args.classifier).glob("*") if f.is_file())
    inception = Path(args.inception) if args.inception else find_default_inception()
    return "|".join((data_fingerprint(args.data, "test"), files_fingerprint(classifier, args.classifier),
                     files_fingerprint([inception] if inception else [], "/")))


def guide_fingerprint(guide_model: str | None) -> str | None:
    """A cheap key for an attached guide's files (a saved guide is part of the model's fingerprint)."""
    from bitdance.pipeline import resolve_generator_path
    from bitdance.utils import files_fingerprint

    if guide_model is None:
        return None
    folder = resolve_generator_path(guide_model)
    return files_fingerprint(sorted(f for f in folder.glob("*") if f.is_file()), folder)


def temperature_tag(temperature: float | None) -> str:
    """'' for the model's own temperature (file names as before the option existed), else 'tempT_'."""
    return "" if temperature is None else f"temp{temperature:g}_"


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | cfg | head steps | temperature | samples | FID | precision | recall | class acc | img/s "
             "| device |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fraction(value):  # precision/recall are None with too few samples for k nearest neighbours
        return "-" if value is None else f"{value:.3f}"

    def setting(value):  # None: the model's own default
        return "model's" if value is None else f"{value:g}"

    for r in rows:
        guide = " (guide)" if r.get("guidance") == "guide" else ""  # autoguidance: the scale is the guide's
        lines.append(f"| {r['name']} | {setting(r['cfg'])}{guide} | {setting(r.get('steps'))} | "
                     f"{setting(r.get('temperature'))} | {r['num_samples']} | {r['fid']:.2f} | "
                     f"{fraction(r['precision'])} | {fraction(r['recall'])} | {100 * r['class_consistency']:.1f}% | "
                     f"{r['images_per_s']:.1f} | {r['device_name']} (batch {r['batch_size']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin", help="pipeline folder or 'builtin'")
    p.add_argument("--name", default=None, help="row label (default: --model)")
    p.add_argument("--out", default="runs/eval/generator", help="folder for the .npz files and results.json")
    add_eval_args(p)
    args = p.parse_args(argv)
    check_eval_inputs(args)
    rows = evaluate(args.model, Path(args.out), args, name=args.name)
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    from bitdance.cli import report_errors

    sys.exit(report_errors(main, Path(__file__).name))
