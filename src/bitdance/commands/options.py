"""Flags shared by several commands, declared once so that their names, defaults and help stay the same."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields

from bitdance.utils import DTYPES as TORCH_DTYPES

DTYPES = tuple(TORCH_DTYPES)  # the --dtype choices: the names resolve_dtype knows
DEVICE_HELP = "cpu, cuda, mps (default: best available)"
TEMPERATURE_HELP = ("the token head's sampling temperature (default: the model's, 1): the scale of the diffusion "
                    "head's per-step sampler noise, or the bitwise head's softmax temperature; 0 = no noise / argmax")


def add_guidance_flags(p, suffix: str = "") -> None:
    """--guidance and --guide-model (autoguidance), for the commands that sample from a pipeline."""
    p.add_argument("--guidance", default=None, choices=("cfg", "guide"),
                   help="guide with the model's null class (cfg) or with a guide model (autoguidance; default: "
                   f"guide when the pipeline has one or --guide-model is given, else cfg){suffix}")
    p.add_argument("--guide-model", default=None, metavar="DIR",
                   help="a weaker generator of the same tokens to guide with (a generator, pipeline or run "
                   f"folder), in place of the pipeline's own guide{suffix}")


def print_from_main_rank(text) -> None:
    """Print a command's result line once: under torchrun only rank 0 prints it (every rank runs the command)."""
    if os.environ.get("RANK", "0") == "0":
        print(text)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' where X tells the reader something.

    Not for None (the help says what happens instead), on/off flags (their stored default reads as the opposite:
    '--no-progress (default: True)'), required options, or help that already names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.nargs == 0 or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


def add_optimisation_flags(group, defaults) -> None:
    """The optimiser flags that `bitdance train` and `bitdance tokenizer train` share.

    `defaults` is the command's config dataclass instance; its fields carry the same names as the flags' dests.
    """
    d = defaults
    group.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    group.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split over DDP ranks)")
    group.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    group.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    group.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    group.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    group.add_argument("--ema", "--ema-decay", dest="ema_decay", type=float, default=d.ema_decay,
                       help="EMA decay (warmed up as min(decay, (1+step)/(10+step)))")
    group.add_argument("--no-ema-export", dest="export_ema", action="store_false",
                       help="export the raw weights instead of the EMA")
    group.add_argument("--seed", type=int, default=d.seed, help="seed (initialisation, data order, noise)")


def add_run_flags(group, defaults) -> None:
    """Device, precision, logging and checkpoint flags of the training commands."""
    d = defaults
    group.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                       help="autocast dtype (bf16 is for GPUs: about 100x slower on CPUs without AMX)")
    group.add_argument("--device", default=None, help=DEVICE_HELP)
    group.add_argument("--log-every", type=int, default=d.log_every, help="steps between loss log lines")
    group.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    group.add_argument("--resume", default=None, help="checkpoint file or run folder to start from when OUT "
                       "has no checkpoint yet (OUT/checkpoint.pt is always resumed first)")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="log lines instead of a bar")


def config_from_args(config_cls, args):
    """The config dataclass filled from the parsed flags that share its field names (the rest keep defaults)."""
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def key_value(text: str) -> tuple[str, object]:
    """argparse type for FIELD=VALUE: the value is read as JSON (384, 0.5, true, [1, 2]), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
