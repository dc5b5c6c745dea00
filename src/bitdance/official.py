"""Official BitDance ImageNet checkpoints: conversion to our pipeline folder, official sampling presets, and
class-balanced distributed sampling into the ADM `.npz` format (ref §3.1, §6.2, §7).

An official `BitDance_{B_1x,B_4x,B_16x,L_1x,H_1x}.pt` is a torch pickle `{"model", "ema", "optimizer", "epochs",
"args"}`. Its state dicts cover the whole official module, frozen tokenizer included (`vae.*`); every other key
already has our name (`models/transformer.py` keeps the official module tree), so conversion is: read the file
safely, take `ema`, set `vae.*` aside, infer the architecture from tensor shapes, load strictly, save.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bitdance.utils import (
    UserError,
    batch_seed,
    check_state_shapes,
    count_parameters,
    load_checkpoint,
    read_json,
    strip_wrapper_prefixes,
    write_json,
)

# ----------------------------------------------------------------------------------------------
# The released models and their official sampling settings (ref §3.1 table, §7.1)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialModel:
    size: str  # preset family in BITDANCE_PRESETS: "B" | "L" | "H"
    parallel: int  # tokens per AR step
    cfg_scale: float  # README sampling command, linear schedule from 1
    file: str  # name in the HF repo shallowdream204/BitDance-ImageNet
    params: str
    fid: float  # paper: FID / IS / precision / recall on ImageNet 256x256, 50k samples
    inception_score: float
    precision: float
    recall: float
    cfg_schedule: str = "linear"
    num_sampling_steps: int = 100  # head steps (--sample-steps 100)


OFFICIAL_MODELS = {
    "B-1x": OfficialModel("B", 1, 3.2, "BitDance_B_1x.pt", "242M", 1.68, 297.1, 0.80, 0.62),
    "B-4x": OfficialModel("B", 4, 3.9, "BitDance_B_4x.pt", "260M", 1.69, 291.2, 0.79, 0.63),
    "B-16x": OfficialModel("B", 16, 6.1, "BitDance_B_16x.pt", "260M", 1.91, 283.8, 0.78, 0.62),
    "L-1x": OfficialModel("L", 1, 4.0, "BitDance_L_1x.pt", "527M", 1.31, 300.2, 0.80, 0.64),
    "H-1x": OfficialModel("H", 1, 4.55, "BitDance_H_1x.pt", "1.0B", 1.24, 304.4, 0.81, 0.64),
}
SIZE_WIDTHS = {"B": 768, "L": 1024, "H": 1280}
OFFICIAL_HEAD_DIM = 64  # every official backbone and ImageNet patch head uses 64-wide attention heads


def official_sampling(name: str) -> dict:
    """The official sampling settings of a released model, as BitDanceConfig fields."""
    m = OFFICIAL_MODELS[name]
    return {"cfg_scale": m.cfg_scale, "cfg_schedule": m.cfg_schedule, "num_sampling_steps": m.num_sampling_steps}


# ----------------------------------------------------------------------------------------------
# Reading an official .pt safely
# ----------------------------------------------------------------------------------------------


def read_official_checkpoint(path: str | os.PathLike) -> dict:
    """Load an official ImageNet `.pt` with weights_only=True (no code from the file runs).

    Its `args` (an argparse.Namespace) is read as `utils.load_checkpoint(official_args=True)` reads it; tensors
    are memory-mapped, so a multi-GB file costs little RAM.
    """
    obj = load_checkpoint(path, mmap=True, official_args=True)
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise UserError(f"{path} is not an official BitDance ImageNet checkpoint: it holds a {kind}")
    return obj


def setting(settings: dict, key: str, source: str, kind: type = float, default=None):
    """settings[key] as `kind` (`default` when absent or None); anything else not a number is a UserError."""
    value = settings.get(key)
    value = default if value is None else value
    try:
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError  # 1.5 is not silently 1
        return kind(number)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{source}: {key}={value!r} is not a{' whole' if kind is int else ''} number") from None


def _plain(value):
    """JSON-safe copy of an `args` value; anything exotic becomes its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def checkpoint_args(obj: dict) -> dict:
    """The training flags stored as `args` (Namespace or dict), as a plain dict; {} if absent."""
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return {str(k): _plain(v) for k, v in args.items()} if isinstance(args, dict) else {}


def select_weights(obj: dict, source: str, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, "ema" | "model"): `ema` like the official sampler, `model` only as a fallback."""
    order = ("ema", "model") if use_ema else ("model", "ema")
    for key in order:
        state = obj.get(key)
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return strip_wrapper_prefixes(state), key  # torch.compile / DDP wrappers, should a file carry them
    raise UserError(f"{source} is not an official BitDance ImageNet checkpoint: no 'ema' or 'model' state dict "
                    f"(top-level keys: {', '.join(map(str, list(obj)[:6])) or 'none'})")


def split_vae(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(generator state, tokenizer state without the `vae.` prefix)."""
    gen = {k: v for k, v in state.items() if not k.startswith("vae.")}
    vae = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    return gen, vae


# ----------------------------------------------------------------------------------------------
# Architecture from shapes
# ----------------------------------------------------------------------------------------------


def _count(state: dict, prefix: str) -> int:
    """1 + the largest i with a key `{prefix}{i}.`; 0 if none."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pat.match(k))]
    return 1 + max(found) if found else 0


def infer_official_config(state: dict, source: str = "checkpoint", model_name: str | None = None,
                          any_size: bool = False, args: dict | None = None):
    """(BitDanceConfig, name) from an official generator state dict's shapes (`vae.*` already removed).

    name is "B-4x" style for the B/L/H widths, or "custom-<dim>" with `any_size`. The training `args`, when
    given, are cross-checked (parallel count, patch mode) and supply the training-only knobs (perturb rate,
    P_mean/P_std, diff_batch_mul). Any inconsistency is a UserError naming the tensor or flag.
    """
    from bitdance.models.transformer import BITDANCE_PRESETS, BitDanceConfig

    args = args or {}
    need = ("cls_embedding.weight", "layers.0.attention.wqkv.weight", "proj_in.w1.weight", "pos_for_diff.weight",
            "head.net.input_proj.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise UserError(f"{source} is not an official BitDance ImageNet checkpoint: no {missing[0]} in it")
    wqkv = state["layers.0.attention.wqkv.weight"]
    dim = int(wqkv.shape[-1])
    if wqkv.ndim != 2 or wqkv.shape[0] != 3 * dim:
        shape = tuple(wqkv.shape)
        raise UserError(f"{source}: layers.0.attention.wqkv.weight has shape {shape}, expected (3d, d)")
    size = next((s for s, w in SIZE_WIDTHS.items() if w == dim), None)
    if size is None and not any_size:
        known = ", ".join(f"{s} {w}" for s, w in SIZE_WIDTHS.items())
        raise UserError(f"{source}: layers.0 width {dim} matches no preset ({known}); "
                        "pass --any-size to convert a custom-size model")
    cls = state["cls_embedding.weight"]
    rows = int(state["pos_for_diff.weight"].shape[0])
    side = math.isqrt(rows)
    q = state.get("query_token")
    parallel = 1 + int(q.shape[1]) if q is not None and q.ndim == 3 else 1
    patch_head = "head.net.res_blocks.0.attn.wqkv.weight" in state
    if patch_head != (parallel > 1):
        layout = "patch attention" if patch_head else "per-token MLP"
        raise UserError(f"{source}: the head layout ({layout}) does not match query_token (parallel {parallel})")
    if side * side != rows:
        raise UserError(f"{source}: pos_for_diff has {rows} rows, not a square token grid")
    if cls.shape[1] % dim:
        raise UserError(f"{source}: cls_embedding width {cls.shape[1]} is not a multiple of the model width {dim}")
    if args.get("parallel_num") not in (None, parallel) and parallel > 1:
        raise UserError(f"{source}: args.parallel_num={args['parallel_num']} but query_token implies {parallel}")
    if parallel > 1 and args.get("parallel_mode", "patch") != "patch":
        raise UserError(f"{source}: parallel_mode={args['parallel_mode']!r} is not supported (only 'patch')")
    if setting(args, "patch_size", source, int, 1) != 1:
        raise UserError(f"{source}: patch_size={args['patch_size']} is not supported (the released models use 1)")
    found = dict(
        dim=dim, n_layers=_count(state, "layers."), num_classes=int(cls.shape[0]) - 1,
        class_tokens=int(cls.shape[1]) // dim, token_bits=int(state["proj_in.w1.weight"].shape[1]),
        grid_size=(side, side), parallel=parallel, head_width=int(state["head.net.input_proj.weight"].shape[0]),
        head_depth=_count(state, "head.net.res_blocks."), head_adaln=_count(state, "head.net.ada_ln_blocks."),
    )
    training = {k: setting(args, k, source, int if k == "diff_batch_mul" else float)
                for k in ("perturb_rate", "P_mean", "P_std", "time_shift", "diff_batch_mul")
                if args.get(k) is not None}  # None: unset

    preset = BITDANCE_PRESETS[size](parallel=parallel) if size else None
    clash = [f for f, v in found.items() if preset is not None and getattr(preset, f) != v]
    if clash and not any_size:
        f = clash[0]
        raise UserError(f"{source}: width {dim} is BitDance-{size}, but its {f} is {found[f]} "
                        f"({size} has {getattr(preset, f)}); pass --any-size to convert it as a custom model")
    if preset is not None and not clash:
        name = f"{size}-{parallel}x"
        config = dataclasses.replace(preset, **training)
    else:
        if dim % OFFICIAL_HEAD_DIM or (parallel > 1 and found["head_width"] % OFFICIAL_HEAD_DIM):
            raise UserError(f"{source}: width {dim} / head width {found['head_width']} must be multiples of "
                            f"{OFFICIAL_HEAD_DIM} (the official attention head width)")
        name = f"custom-{dim}"
        base = BITDANCE_PRESETS["B"](parallel=parallel)  # B's sampling settings for this parallel count
        config = BitDanceConfig(**{**dataclasses.asdict(base), **found, **training,
                                   "n_heads": dim // OFFICIAL_HEAD_DIM, "head_attn_dim": OFFICIAL_HEAD_DIM})
    if model_name is not None and model_name != name:
        raise UserError(f"{source} holds a {name} model, not {model_name} (--model-name)")
    if name in OFFICIAL_MODELS:
        config = dataclasses.replace(config, **official_sampling(name))
    return config, name


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def tokenizer_from_state(state: dict[str, torch.Tensor], source: str):
    """An official tokenizer state dict (the checkpoint's own `vae.*`) -> ImageTokenizer, strictly."""
    from bitdance.models.autoencoder import ImageTokenizer
    from bitdance.models.autoencoder_official import infer_config

    state = {k: v for k, v in state.items() if not k.startswith("quantize.")}  # quantizer buffers: not weights
    config = infer_config(state, source)
    model = ImageTokenizer(config)
    check_state_shapes(model, state, source, "the inferred model")
    model.load_state_dict(state, strict=True)
    return model.eval()


def write_pipeline(tokenizer, generator, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save the BitDancePipeline folder (`tokenizer/`, `generator/`, model_index.json + `extra`)."""
    from bitdance.pipeline import MODEL_INDEX, BitDancePipeline

    directory = BitDancePipeline(tokenizer, generator).save_pretrained(directory)
    index = read_json(directory / MODEL_INDEX)
    write_json({**index, **(extra or {})}, directory / MODEL_INDEX)
    return directory


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                     model_name: str | None = None, any_size: bool = False, use_ema: bool = True,
                     overrides: dict | None = None, force: bool = False, log=print) -> dict:
    """Convert an official ImageNet `.pt` (+ official tokenizer file) into a pipeline folder at `dst`.

    tokenizer: `ae_d16c32.pt` ({"state_dict"}), `ae.safetensors` + `ae_config.json` or their folder; None uses
    the checkpoint's own frozen `vae.*` weights. overrides: BitDanceConfig sampling fields (cfg_scale, ...).
    Returns a summary dict (also stored under "official" in model_index.json).
    """
    from bitdance.models.autoencoder import ImageTokenizer
    from bitdance.models.transformer import BitDance

    src, dst = Path(src), Path(dst)
    if (dst / "model_index.json").exists() and not force:
        raise UserError(f"{dst} already holds a converted model; choose another DST or pass --force")
    obj = read_official_checkpoint(src)
    state, which = select_weights(obj, str(src), use_ema)
    if which != "ema":
        log(f"note: {src} has no 'ema' weights; using 'model'")
    args = checkpoint_args(obj)
    gen_state, vae_state = split_vae(state)
    if which == "ema" and isinstance(obj.get("model"), dict):
        # the tokenizer is frozen in training: the `model` copy is the tokenizer itself, while the EMA copy went
        # through every EMA update (d x + (1 - d) x need not round back to x)
        vae_state = split_vae(select_weights(obj, str(src), use_ema=False)[0])[1] or vae_state
    gen_state = {k: v for k, v in gen_state.items() if not (k == "query_token" and v.numel() == 0)}
    config, name = infer_official_config(gen_state, str(src), model_name, any_size, args)
    if overrides:
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})

    generator = BitDance(config)
    check_state_shapes(generator, gen_state, str(src), "the inferred model")
    generator.load_state_dict(gen_state, strict=True)
    generator.eval()

    if tokenizer is not None:
        tok = ImageTokenizer.from_official(tokenizer)
        tok_source, tok_name = str(tokenizer), Path(tokenizer).name
        if vae_state and "decoder.conv_out.weight" in vae_state and not torch.equal(
                vae_state["decoder.conv_out.weight"].float(), tok.decoder.conv_out.weight):
            log(f"note: {tokenizer} differs from {src}'s own vae.* weights; using {tokenizer} (as the official "
                "sampler does)")
    elif vae_state:
        tok_source, tok_name = f"{src} (vae.*)", f"{src.name} (vae.*)"
        tok = tokenizer_from_state(vae_state, tok_source)
    else:
        raise UserError(f"{src} holds no vae.* tokenizer weights; pass --tokenizer ae_d16c32.pt")
    if tok.config.z_channels != config.token_bits:
        raise UserError(f"tokenizer {tok_source} makes {tok.config.z_channels}-bit tokens, the model "
                        f"{config.token_bits}-bit ones")
    image_size = config.grid_size[0] * tok.config.downsample_factor
    if args.get("image_size") not in (None, image_size):
        raise UserError(f"{src}: args.image_size={args['image_size']} but model and tokenizer give {image_size}")
    tok.config = dataclasses.replace(tok.config, resolution=image_size)

    summary = {
        "model_name": name, "source": src.name, "weights": which, "epochs": _plain(obj.get("epochs")),
        "tokenizer": tok_name, "image_size": image_size,
        "parameters": count_parameters(generator),
        "sampling": {"cfg_scale": config.cfg_scale, "cfg_schedule": config.cfg_schedule,
                     "num_sampling_steps": config.num_sampling_steps},
        "args": args,
    }
    write_pipeline(tok, generator, dst, {"official": summary})
    return summary


# ----------------------------------------------------------------------------------------------
# Class-balanced sampling (50 per class, label order) into the ADM .npz, resumable, DDP
# ----------------------------------------------------------------------------------------------


@dataclass
class SampleSetConfig:
    model: str  # converted pipeline folder
    out: str  # final .npz; chunks go to <out without .npz>.chunks/
    per_class: int = 50
    num_classes: int | None = None  # first C classes; None: all of the model's
    batch_size: int = 32  # per process; also the chunk size (one file per batch)
    seed: int = 0
    cfg_scale: float | None = None  # None: the model's saved (official) settings
    cfg_schedule: str | None = None
    num_steps: int | None = None
    temperature: float | None = None  # the head's sampling temperature; None: the model's (1, the official sampler)
    dtype: str = "float32"  # "bfloat16" autocasts on GPU
    device: str | None = None
    progress: bool = True


def _chunk_path(chunk_dir: Path, start: int) -> Path:
    return chunk_dir / f"{start:07d}.npz"


def _settings(cfg: SampleSetConfig, generator_config, num_classes: int, device: torch.device) -> dict:
    """Everything that decides the pixels of a chunk; a resumed run must match it."""
    from bitdance.pipeline import model_fingerprint
    from bitdance.sampling import sampling_settings

    # checked now: a value no sampler accepts must not be written into the settings a resume has to match
    num_steps, cfg_scale, cfg_schedule = sampling_settings(generator_config, cfg.num_steps, cfg.cfg_scale,
                                                           cfg.cfg_schedule)
    # the model folder's files (a re-conversion at the same path is another model) and the device type (the
    # generator's random stream differs between CPU and CUDA) decide the images as much as the numbers below
    return {"model": str(Path(cfg.model).resolve()), "model_files": model_fingerprint(cfg.model),
            "device": device.type, "per_class": cfg.per_class, "num_classes": num_classes,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "dtype": cfg.dtype,
            "cfg_scale": cfg_scale, "cfg_schedule": cfg_schedule, "num_steps": num_steps,
            "temperature": generator_config.head_temperature if cfg.temperature is None else cfg.temperature,
            "seeding": "batch of global indices [s, s+batch): torch.Generator(seed * 1000003 + s)",
            "labels": "global index i -> class i // per_class"}


def sample_class_balanced(cfg: SampleSetConfig) -> Path | None:
    """Sample per_class images of each class in label order into `cfg.out` (arr_0 uint8 NHWC, arr_1 labels).

    Works alone or under torchrun (gloo on CPU, nccl on GPU). The global indices are cut into chunks of
    `batch_size`; each missing chunk is sampled by one rank with a generator seeded from its first index and
    written atomically, so a rerun (any world size) does only the missing chunks and gives the same images.
    Rank 0 merges the chunks in order. Returns the .npz path on rank 0, None elsewhere.
    """
    from tqdm.auto import tqdm

    from bitdance.evaluation.npz import save_npz
    from bitdance.flow import check_temperature
    from bitdance.pipeline import BitDancePipeline
    from bitdance.utils import barrier, cleanup_distributed, init_distributed

    out = Path(cfg.out)
    if out.suffix != ".npz":
        raise UserError(f"--out must be a .npz file, got {out}")
    if cfg.per_class < 1 or cfg.batch_size < 1:
        raise UserError("--per-class and --per-proc-batch-size must be at least 1")
    check_temperature(cfg.temperature)  # before the model is loaded
    info = init_distributed(cfg.device)
    try:
        pipe = BitDancePipeline.from_pretrained(cfg.model, device=info.device, dtype=cfg.dtype)
        gc = pipe.model.config
        num_classes = gc.num_classes if cfg.num_classes is None else cfg.num_classes
        if not 1 <= num_classes <= gc.num_classes:
            raise UserError(f"--num-classes must be in 1..{gc.num_classes}, got {num_classes}")
        settings = _settings(cfg, gc, num_classes, info.device)
        if info.enabled:  # rank 0's view (file times may differ between nodes' copies): every rank checks alike
            shared = [settings]
            dist.broadcast_object_list(shared, src=0)
            settings = shared[0]
        total = cfg.per_class * num_classes
        chunk_dir = out.with_suffix(".chunks")
        sidecar = chunk_dir / "settings.json"
        done = out.with_suffix(".json")
        if out.is_file() and done.is_file() and {k: read_json(done).get(k) for k in settings} == settings:
            return out if info.is_main else None  # finished earlier with the same settings
        if sidecar.is_file() and (old := read_json(sidecar)) != settings:  # every rank refuses alike
            diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            raise UserError(f"{chunk_dir} was sampled with other settings ({'; '.join(diff[:3])}); "
                            "use another --out or delete that folder")
        # every rank makes the folder: one it cannot make (permissions, a file in the way) fails every rank alike,
        # instead of rank 0 alone while the others wait at the barrier for the backend's timeout
        chunk_dir.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            write_json(settings, sidecar)
        barrier(info)

        starts = range(0, total, cfg.batch_size)
        # every rank lists the same missing chunks: nobody writes one before all have listed (second barrier)
        todo = [s for s in starts if not _chunk_path(chunk_dir, s).is_file()][info.rank :: info.world_size]
        barrier(info)
        bar = tqdm(total=len(todo) * cfg.batch_size, desc=f"sampling ({info.world_size} proc)", unit="img",
                   disable=not (cfg.progress and info.is_main))
        t0, made = time.perf_counter(), 0
        for s in todo:
            e = min(s + cfg.batch_size, total)
            labels = np.arange(s, e) // cfg.per_class  # (b,) label order
            gen = torch.Generator(device=info.device).manual_seed(batch_seed(cfg.seed, s))
            images = pipe(class_labels=labels.tolist(), num_inference_steps=settings["num_steps"],
                          guidance_scale=settings["cfg_scale"], cfg_schedule=settings["cfg_schedule"],
                          temperature=settings["temperature"], generator=gen, output_type="np",
                          progress=False).images  # (b, H, W, c) uint8
            save_npz(_chunk_path(chunk_dir, s), images, labels)
            made += e - s
            bar.update(e - s)
        bar.close()
        rate = made / max(time.perf_counter() - t0, 1e-9)
        barrier(info)
        if not info.is_main:
            return None
        return _merge(chunk_dir, starts, total, out, {**settings, "images_per_s_rank0": round(rate, 3),
                                                      "world_size": info.world_size})
    finally:
        cleanup_distributed(info)


def _merge(chunk_dir: Path, starts, total: int, out: Path, settings: dict) -> Path:
    """Concatenate the chunk files in index order into one ADM .npz (+ out.json with the settings)."""
    from bitdance.evaluation.npz import load_npz, save_npz

    missing = [s for s in starts if not _chunk_path(chunk_dir, s).is_file()]
    if missing:
        raise UserError(f"{len(missing)} chunk(s) missing in {chunk_dir} (first at index {missing[0]}); rerun")
    images = labels = None
    for s in starts:
        img, lab = load_npz(_chunk_path(chunk_dir, s))
        if images is None:  # preallocate: 50k 256x256 RGB images are 9.8 GB, concatenating would double that
            images = np.empty((total, *img.shape[1:]), dtype=np.uint8)
            labels = np.empty((total,), dtype=np.int64)
        images[s : s + len(img)], labels[s : s + len(img)] = img, lab
    save_npz(out, images, labels)
    write_json(settings, out.with_suffix(".json"))
    return out


def describe(summary: dict) -> str:
    """One line for the CLI."""
    s = summary["sampling"]
    return (f"converted {summary['model_name']} ({summary['parameters'] / 1e6:.1f} M parameters, "
            f"{summary['weights']} weights, epoch {summary['epochs']}; cfg {s['cfg_scale']} {s['cfg_schedule']}, "
            f"{s['num_sampling_steps']} head steps; tokenizer {summary['tokenizer']}, "
            f"{summary['image_size']}x{summary['image_size']})")


__all__ = ["OFFICIAL_MODELS", "SampleSetConfig", "convert_official", "infer_official_config",
           "read_official_checkpoint", "sample_class_balanced", "write_pipeline"]
