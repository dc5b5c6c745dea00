"""ADM-style sample batches: one `.npz` with `arr_0` (uint8 images, NHWC) and `arr_1` (int64 labels).

This is the layout the OpenAI guided-diffusion evaluator reads (DiT's and the official BitDance
`sample_ddp.py --to-npz` write the same). Grayscale images are stored as c = 1 by default, which keeps
the file faithful to the model's output; the TensorFlow evaluator expects RGB, so `rgb=True` repeats the
channel to 3 at save time.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from bitdance.utils import UserError, atomic_path, batch_seed


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; avoid importing torch for a type check
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def save_npz(path: str | os.PathLike, images, labels=None, rgb: bool = False) -> Path:
    """Write `images` uint8 (n, H, W, c) with c in {1, 3} and optional `labels` (n,) atomically.

    `rgb=True` repeats a single channel to three (for the ADM TensorFlow evaluator).
    """
    path = Path(path)
    images = _as_numpy(images)
    if images.dtype != np.uint8:
        raise UserError(f"save_npz({path}): images must be uint8 (n, H, W, c), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"save_npz({path}): images must be (n, H, W, c) with c 1 or 3, got {images.shape}")
    if rgb and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)  # (n, H, W, 3)
    arrays = {"arr_0": np.ascontiguousarray(images)}
    if labels is not None:
        labels = _as_numpy(labels).astype(np.int64).reshape(-1)  # (n,)
        if labels.shape[0] != images.shape[0]:
            raise UserError(f"save_npz({path}): {labels.shape[0]} labels for {images.shape[0]} images")
        arrays["arr_1"] = labels
    # np.savez appends ".npz" to a bare file name, so hand it an open file to keep the temp name exact.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM-style `.npz`: returns (images uint8 (n, H, W, c), labels int64 (n,) or None).

    A 3-D `arr_0` (n, H, W) is read as grayscale with c = 1.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"samples file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"cannot read {path} as an .npz sample file: {type(e).__name__}: {str(e)[:200]}")
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is a single .npy array, not an .npz with arr_0 (images) and arr_1 (labels)")
    with data:
        if "arr_0" not in data.files:
            raise UserError(f"{path} has no arr_0 (images); it holds {', '.join(data.files) or 'nothing'}")
        try:
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"cannot read arrays from {path}: {type(e).__name__}: {str(e)[:200]}")
    if images.ndim == 3:
        images = images[..., None]  # (n, H, W, 1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(
            f"{path}: arr_0 must be uint8 images (n, H, W, c), c 1 or 3; got {images.dtype} {images.shape}"
        )
    if labels is not None:
        integer = np.issubdtype(labels.dtype, np.integer)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not integer:
            raise UserError(
                f"{path}: arr_1 must hold one integer label per image ({images.shape[0]}), "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
    return images, labels


# ----------------------------------------------------------------------------------------------
# Sample batches from a model
# ----------------------------------------------------------------------------------------------


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., C-1, 0, 1, ...: every class within one sample of the others, for any n."""
    return (np.arange(num_samples) % num_classes).astype(np.int64)  # (n,)


def generate_samples(model: str | os.PathLike, num_samples: int, num_classes: int | None = None,
                     batch_size: int = 50, seed: int = 0, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, device=None, progress: bool = True,
                     cfg_schedule: str | None = None, dtype: str | None = None,
                     temperature: float | None = None, guidance: str | None = None,
                     guide_model: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sample `num_samples` images from a saved pipeline (a folder, 'builtin', or a loaded BitDancePipeline),
    classes cycled 0..C-1.

    Batch i starts at global index s = i * batch_size and uses its own generator seeded with
    `seed * 1_000_003 + s`, so no two batches (and no two classes) share noise and a run is reproducible
    from (seed, batch_size). guidance ("cfg" or "guide") and guide_model (a generator folder to guide with, for a
    pipeline loaded here) as in `BitDancePipeline`. Returns (images uint8 (n, H, W, c), labels (n,), settings).
    """
    import torch
    from tqdm.auto import tqdm

    from bitdance.pipeline import BitDancePipeline

    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if isinstance(model, BitDancePipeline):
        if guide_model is not None:  # changing a caller's pipeline behind its back would outlive this call
            raise ValueError("guide_model is for a pipeline loaded here: attach one to a loaded pipeline with "
                             "set_guide")
        pipe = model
    else:
        pipe = BitDancePipeline.from_pretrained(model, guide_model=guide_model)
    if (device is not None or dtype is not None) and hasattr(pipe, "to"):
        pipe = pipe.to(device, dtype=dtype) or pipe  # dtype: the autocast dtype (e.g. bfloat16 on a GPU)
    num_classes = getattr(pipe, "num_classes", None) or num_classes
    if not num_classes:
        raise UserError(f"cannot tell how many classes {model} has; give a data set with class names")
    labels = balanced_labels(num_samples, int(num_classes))
    images = []
    for start in tqdm(range(0, num_samples, batch_size), desc="sampling", disable=not progress):
        gen = torch.Generator(device=device or "cpu").manual_seed(batch_seed(seed, start))
        out = pipe(class_labels=labels[start:start + batch_size].tolist(),
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   cfg_schedule=cfg_schedule, generator=gen, output_type="np", progress=False,
                   temperature=temperature, guidance=guidance)
        images.append(np.asarray(out.images, dtype=np.uint8))  # (b, H, W, c)
    source = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    model_config = getattr(getattr(pipe, "model", None), "config", None)  # None for a stand-in pipeline
    head_steps = num_inference_steps or getattr(model_config, "num_sampling_steps", None)  # what was used
    settings = {"model": source, "num_samples": num_samples, "num_classes": int(num_classes),
                "labels": "cycled 0..C-1", "seed": seed, "seeding": "per batch: seed * 1000003 + first index",
                "batch_size": batch_size, "num_inference_steps": num_inference_steps, "head_steps": head_steps,
                "guidance_scale": guidance_scale, "cfg_schedule": cfg_schedule, "temperature": temperature,
                "guidance": pipe.guide_kind(guidance) if hasattr(pipe, "guide_kind") else "cfg",
                "guide_model": None if guide_model is None else str(guide_model),
                "dtype": str(getattr(pipe, "dtype", dtype or "float32")).removeprefix("torch.")}
    return np.concatenate(images), labels, settings
