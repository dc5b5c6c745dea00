"""BitDancePipeline: a frozen tokenizer + a `BitDance` generator, class labels in, images out.

A pipeline folder (diffusers layout, written by `save_pretrained`, read by `from_pretrained`):

    model_index.json   {"_class_name": "BitDancePipeline", "tokenizer": [...], "generator": [...], "class_names": [...]}
    tokenizer/         ImageTokenizer.save_pretrained (config.json + model.safetensors)
    generator/         BitDance.save_pretrained (EMA weights after training)
    guide/             optional: a weaker BitDance of the same tokens for autoguidance (model_index.json then
                       also holds "guide_scale" and "guide_schedule", the defaults of guidance="guide")

    pipe = BitDancePipeline.from_pretrained("runs/gen/model")        # or "builtin"
    out = pipe(class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0))
    out.images  # PIL images | uint8 (n, H, W, c) | float (n, c, H, W) in [-1, 1]

None sampling arguments take the generator's saved defaults (cfg scale, schedule, head steps); with a guide,
guidance="guide" is the default and takes the pipeline's guide scale and schedule.
"""

from __future__ import annotations

import importlib.resources
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitdance.models.autoencoder import ImageTokenizer
from bitdance.models.transformer import BitDance
from bitdance.sampling import check_guide, generate, sampling_settings
from bitdance.utils import UserError, autocast, files_fingerprint, read_json, resolve_dtype, to_uint8, write_json

MODEL_INDEX = "model_index.json"
OUTPUT_TYPES = ("pil", "np", "pt", "codes")
GUIDANCE_KINDS = ("cfg", "guide")  # the null class of the model itself, or a guide model (autoguidance)


@dataclass
class ImageOutput:
    images: Any  # list of PIL images | np.ndarray uint8 (n, H, W, c) | torch.Tensor float32 (n, c, H, W) in [-1, 1]


def builtin_path() -> Path:
    """Folder of the built-in model shipped as package data (it may not exist)."""
    return Path(str(importlib.resources.files("bitdance") / "builtin"))


def resolve_model_path(path: str | os.PathLike) -> Path:
    """'builtin' -> the packaged model; a training run folder -> its `model/`; else the folder itself."""
    if str(path) == "builtin":
        p = builtin_path()
        if not (p / MODEL_INDEX).is_file():
            raise UserError("the built-in model is not installed in this copy of bitdance; pass --model DIR "
                            "(a folder written by `bitdance train`, e.g. runs/gen/model)")
        return p
    p = Path(path)
    if not p.exists():
        raise UserError(f"model folder not found: {p}")
    if not (p / MODEL_INDEX).is_file() and (p / "model" / MODEL_INDEX).is_file():
        p = p / "model"  # a training run folder was given
    if not (p / MODEL_INDEX).is_file():
        raise UserError(f"{p} is not a BitDance pipeline folder (no {MODEL_INDEX}; expected tokenizer/ + generator/)")
    return p


def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap key for a pipeline's files (model_index.json, the components' configs and weights; stat only): a
    model retrained or re-converted into the same folder gets another one."""
    root = resolve_model_path(path)
    files = [root / MODEL_INDEX] + sorted(f for sub in ("tokenizer", "generator", "guide")
                                          for f in (root / sub).glob("*") if f.is_file())
    return files_fingerprint(files, root)


def resolve_tokenizer_path(path: str | os.PathLike = "builtin") -> Path:
    """The tokenizer weights folder behind `path`: itself, a pipeline's `tokenizer/` ("builtin": the packaged
    model's), or a training run's `model/` (a tokenizer run) or `model/tokenizer/` (a generator run)."""
    return _component_path(path, "tokenizer", ("tokenizer", "model", "model/tokenizer"))


def resolve_generator_path(path: str | os.PathLike) -> Path:
    """The generator weights folder behind `path`: itself, a pipeline's `generator/` ("builtin": the packaged
    model's), or a training run's `model/generator/`."""
    return _component_path(path, "generator", ("generator", "model/generator"))


def _component_path(path: str | os.PathLike, component: str, subfolders: tuple[str, ...]) -> Path:
    """The first of `path` and its `subfolders` that holds a saved module (config.json + model.safetensors)."""
    root = resolve_model_path(path) if str(path) == "builtin" else Path(path)
    if not root.exists():
        raise UserError(f"{component} folder not found: {root}")
    for candidate in (root, *(root / sub for sub in subfolders)):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    *first, last = [f"{sub}/" for sub in subfolders]
    raise UserError(f"no {component} found in {root}: it holds no saved {component} (config.json + "
                    f"model.safetensors) in itself or in {', '.join(first)} or {last}")


def decode_codes(tokenizer: ImageTokenizer, codes: torch.Tensor, generator: torch.Generator | None = None):
    """±1 token codes (b, k, h, w) -> images (b, c, H, W). A VQ tokenizer's tokens are its index bits."""
    if tokenizer.config.quantizer == "vq":
        from bitdance.models.quantizer import bits_to_indices

        return tokenizer.decode_indices(bits_to_indices(codes, tokenizer.config.group_size), generator=generator)
    return tokenizer.decode(codes, generator=generator)


def check_compatible(tokenizer: ImageTokenizer, model: BitDance, where: str = "pipeline") -> None:
    """The generator's tokens must have the tokenizer's bits per token (any grid decodes: the decoder is
    convolutional, images are grid x downsampling factor)."""
    tc, mc = tokenizer.config, model.config
    if mc.token_bits != tc.z_channels:
        raise UserError(f"{where}: generator uses {mc.token_bits}-bit tokens, tokenizer gives {tc.z_channels}")


class BitDancePipeline:
    """Class-conditional image generation: `BitDance` samples ±1 token codes, the tokenizer decodes them."""

    def __init__(self, tokenizer: ImageTokenizer, model: BitDance, class_names: list[str] | None = None,
                 dtype: str | torch.dtype = "float32", guide_model: BitDance | None = None,
                 guide_scale: float | None = None, guide_schedule: str | None = None):
        check_compatible(tokenizer, model)
        self.tokenizer = tokenizer.eval()
        self.model = model.eval()
        self.set_guide(guide_model, guide_scale, guide_schedule)
        n = model.config.num_classes
        names = list(class_names) if class_names else [str(i) for i in range(n)]
        if len(names) != n:
            raise UserError(f"{len(names)} class names for a generator with {n} classes")
        self.class_names = names
        self.dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = "builtin", device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32",
                        guide_model: str | os.PathLike | None = None) -> "BitDancePipeline":
        """Load a pipeline folder (or "builtin", or a training run folder holding `model/`). Fully offline.

        guide_model: a generator folder (or a pipeline or run folder holding one) to guide with (autoguidance),
        in place of a saved guide; its scale and schedule default to the saved guide's, else the generator's cfg."""
        root = resolve_model_path(path)
        index = read_json(root / MODEL_INDEX)
        if not isinstance(index, dict) or index.get("_class_name") != cls.__name__:
            raise UserError(f"{root / MODEL_INDEX} does not describe a {cls.__name__}")
        for sub in ("tokenizer", "generator"):
            if not (root / sub).is_dir():
                raise UserError(f"{root} has no {sub}/ folder")
        tokenizer = ImageTokenizer.from_pretrained(root / "tokenizer", device=device)
        model = BitDance.from_pretrained(root / "generator", device=device)
        check_compatible(tokenizer, model, where=str(root))
        guide = None
        if guide_model is not None:
            guide = BitDance.from_pretrained(resolve_generator_path(guide_model), device=device)
        elif "guide" in index:
            if not (root / "guide").is_dir():
                raise UserError(f"{root / MODEL_INDEX} names a guide but {root} has no guide/ folder")
            guide = BitDance.from_pretrained(root / "guide", device=device)
        return cls(tokenizer, model, index.get("class_names"), dtype=dtype, guide_model=guide,
                   guide_scale=index.get("guide_scale"), guide_schedule=index.get("guide_schedule"))

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        guide_dtype: torch.dtype | None = None) -> Path:
        """Write the pipeline folder; `dtype` (e.g. torch.float16) stores the weights at half precision.
        `guide_dtype` (default: `dtype`) is the guide's: torch.int8 stores it in a quarter of fp32 (a guide is a
        deliberately weaker model, so 8-bit rounding costs it little; PretrainedMixin.save_pretrained)."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / "tokenizer", dtype=dtype)
        self.model.save_pretrained(directory / "generator", dtype=dtype)
        guide = {}
        if self.guide_model is not None:
            self.guide_model.save_pretrained(directory / "guide", dtype=guide_dtype or dtype)
            guide = {"guide": ["bitdance", type(self.guide_model).__name__], "guide_scale": self.guide_scale,
                     "guide_schedule": self.guide_schedule}
        h, w = self.image_size
        write_json({"_class_name": type(self).__name__,
                    "tokenizer": ["bitdance", type(self.tokenizer).__name__],
                    "generator": ["bitdance", type(self.model).__name__], **guide,
                    "class_names": self.class_names, "image_size": [h, w],
                    "channels": self.tokenizer.config.out_channels}, directory / MODEL_INDEX)
        return directory

    def set_guide(self, guide_model: BitDance | None, scale: float | None = None, schedule: str | None = None):
        """Attach (or with None, remove) a guide model for autoguidance, on the pipeline's device; scale and
        schedule (None: the generator's cfg defaults) become the defaults of guidance="guide". Returns self."""
        if guide_model is not None:
            check_guide(self.model, guide_model)
            # checked here, not at the first call: a bad default saved in model_index.json is an error on load
            scale, schedule = sampling_settings(self.model.config, None, scale, schedule, guided=True)[1:]
            guide_model = guide_model.eval().to(self.device)
        self.guide_model = guide_model
        self.guide_scale = scale if guide_model is not None else None
        self.guide_schedule = schedule if guide_model is not None else None
        return self

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        """Move the components (and the guide model); `dtype` sets the autocast dtype (weights stay fp32). Returns
        self."""
        if device is not None:
            for part in (self.tokenizer, self.model, self.guide_model):
                if part is not None:
                    part.to(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
        return self

    # -- properties -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.model.config.grid_size
        f = self.tokenizer.config.downsample_factor
        return h * f, w * f

    def class_ids(self, labels) -> list[int]:
        """Class ids from ints or class names (case-insensitive); UserError on an unknown one, a float or a bool."""
        if isinstance(labels, str) or np.ndim(labels) == 0:  # one label: int, str, NumPy scalar, 0-d tensor
            labels = [labels]
        lookup = {name.lower(): i for i, name in enumerate(self.class_names)}
        ids = []
        for lab in labels:
            if isinstance(lab, (torch.Tensor, np.generic)) and lab.ndim == 0:
                lab = lab.item()  # a Python int, float or bool
            # int(1.7) would quietly pick class 1, and True is an int to Python
            if isinstance(lab, bool) or not isinstance(lab, (int, str)):
                raise UserError(f"class labels must be integer ids or class names, got {lab!r}")
            if isinstance(lab, str):  # a name first: class folders may be named "1", "10", "2"
                if lab.lower() in lookup:
                    lab = lookup[lab.lower()]
                elif not lab.lstrip("-").isdigit():
                    raise UserError(f"unknown class {lab!r}; classes: {', '.join(self.class_names)}")
            lab = int(lab)
            if not 0 <= lab < self.num_classes:
                raise UserError(f"class label {lab} is out of range 0..{self.num_classes - 1}")
            ids.append(lab)
        return ids

    # -- generation -------------------------------------------------------------------------------

    def guide_kind(self, guidance: str | None = None) -> str:
        """The guidance a call uses: `guidance` checked, or by default "guide" when there is a guide model."""
        if guidance is None:
            return "cfg" if self.guide_model is None else "guide"
        if guidance not in GUIDANCE_KINDS:
            raise UserError(f"guidance must be one of {', '.join(GUIDANCE_KINDS)}, got {guidance!r}")
        if guidance == "guide" and self.guide_model is None:
            raise UserError("guidance 'guide' needs a guide model: this pipeline has none (attach one with "
                            "set_guide, or --guide-model DIR)")
        return guidance

    def __call__(self, class_labels=None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil", progress: bool = True, return_dict: bool = True,
                 cfg_schedule: str | None = None, use_cache: bool = True, temperature: float | None = None,
                 guidance: str | None = None):
        """One image per class label (ids or names; None: one per class). The generator may live on the CPU or
        on the pipeline's device (a CPU generator gives the same images on any device, up to rounding).
        num_inference_steps = head (flow) steps per AR step (a bitwise head samples in one shot and ignores them);
        temperature = the head's sampling temperature (diffusion head: the scale of the flow sampler's per-step
        noise, 1 = official; None: the model's). guidance: "cfg" (the model's null class) or "guide" (the
        pipeline's guide model, autoguidance); None: "guide" when the pipeline has a guide model. guidance_scale and
        cfg_schedule None then take that kind's defaults.

        output_type: "pil" -> a list of PIL images ('L' or 'RGB'); "np" -> uint8 (n, H, W, c) in 0..255; "pt" ->
        float32 (n, c, H, W) in [-1, 1], the tokenizer's range (not diffusers' [0, 1]: use (x + 1) / 2); "codes" ->
        the sampled token codes, float32 (n, k, h, w) of ±1, not decoded."""
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        ids = list(range(self.num_classes)) if class_labels is None else self.class_ids(class_labels)
        if not ids:
            raise UserError("no class labels given")
        if num_inference_steps is not None and self.model.config.head == "bitwise":
            # a warning shows once per call site, not on every batch of a sampling loop
            warnings.warn("num_inference_steps is ignored: the bitwise head samples each token in one shot "
                          "(it has no flow steps)", stacklevel=2)
        guide = self.guide_kind(guidance) == "guide"
        if guide:
            guidance_scale = self.guide_scale if guidance_scale is None else guidance_scale
            cfg_schedule = self.guide_schedule if cfg_schedule is None else cfg_schedule
        device = self.device
        labels = torch.tensor(ids, dtype=torch.long, device=device)  # (b,)
        # inference_mode skips autograd bookkeeping on every op: sampling is thousands of small ops
        with torch.inference_mode(), autocast(device, self.dtype):
            codes = generate(self.model, labels, num_steps=num_inference_steps, cfg_scale=guidance_scale,
                             cfg_schedule=cfg_schedule, generator=generator, use_cache=use_cache,
                             progress=progress, temperature=temperature,
                             guide_model=self.guide_model if guide else None)  # (b, k, h, w)
            if output_type != "codes":
                images = decode_codes(self.tokenizer, codes, generator=generator)  # (b, c, H, W)
        if output_type == "codes":
            out = codes.float().cpu().clone()  # a normal tensor again, as the images below
            return ImageOutput(images=out) if return_dict else (out,)
        images = images.float().clamp(-1, 1).cpu().clone()  # a normal tensor again (usable with autograd)
        if output_type == "pt":
            out = images
        elif output_type == "np":
            out = to_uint8(images).numpy()  # (b, H, W, c)
        else:
            out = to_pil(images)
        return ImageOutput(images=out) if return_dict else (out,)


def to_pil(images: torch.Tensor) -> list:
    """(n, c, H, W) in [-1, 1] -> PIL images ('L' for one channel, 'RGB' for three)."""
    from PIL import Image

    arr = to_uint8(images).numpy()  # (n, H, W, c)
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]
