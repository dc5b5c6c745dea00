"""The official BitDance tokenizer checkpoint layout: key shapes, `ae_config.json`, file readers and writers.

`ImageTokenizer.from_official` uses these to load `ae_config.json` + `ae.safetensors` folders and `.pt`
dicts (e.g. `ae_d16c32.pt`, read with weights_only=True) strictly; `save_official` writes the official pair.
The key shapes are written out from the spec (ref §6.2), independently of the module tree, so a strict load
of `random_official_state_dict` is a real check of our parameter names.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from bitdance.models.autoencoder import TOKENIZER_PRESETS, ImageTokenizer, TokenizerConfig
from bitdance.utils import (
    UserError,
    atomic_path,
    load_checkpoint,
    read_json,
    read_safetensors,
    strip_wrapper_prefixes,
    write_json,
)

log = logging.getLogger("bitdance.official")

OFFICIAL_CONFIG_NAME = "ae_config.json"
OFFICIAL_WEIGHTS_NAME = "ae.safetensors"
TOKENIZER_MODULES = ("encoder", "decoder", "quantize")  # the top-level modules of the official autoencoder


def official_key_shapes(config: TokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official `VQModel` (ref §6.2) with its shape, written out from the spec.

    Kept independent of the module tree in autoencoder.py, so that loading `random_official_state_dict` strictly is a
    real check of our parameter names. Quantizer state (the VQ codebook) is ours, not official, and is
    included only for the vq quantizer.
    """
    ch, mult, nres, z = config.ch, config.ch_mult, config.num_res_blocks, config.z_channels
    shapes: dict[str, tuple[int, ...]] = {}

    def gn(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def res(name, ci, co):
        gn(f"{name}.norm1", ci)
        shapes[f"{name}.conv1.weight"] = (co, ci, 3, 3)
        gn(f"{name}.norm2", co)
        shapes[f"{name}.conv2.weight"] = (co, co, 3, 3)
        if ci != co:
            shapes[f"{name}.nin_shortcut.weight"] = (co, ci, 1, 1)

    shapes["encoder.conv_in.weight"] = (ch, config.in_channels, 3, 3)
    in_mult = (1,) + tuple(mult)
    for i in range(len(mult)):
        ci, co = ch * in_mult[i], ch * mult[i]
        for j in range(nres):
            res(f"encoder.down.{i}.block.{j}", ci if j == 0 else co, co)
        if i < len(mult) - 1:
            shapes[f"encoder.down.{i}.downsample.weight"] = (co, co, 3, 3)
            shapes[f"encoder.down.{i}.downsample.bias"] = (co,)
    top = ch * mult[-1]
    for j in range(nres):
        res(f"encoder.mid_block.{j}", top, top)
    gn("encoder.norm_out", top)
    shapes["encoder.conv_out.weight"], shapes["encoder.conv_out.bias"] = (z, top, 1, 1), (z,)

    shapes["decoder.conv_in.weight"] = (top, z * (2 if config.gan_decoder else 1), 3, 3)
    shapes["decoder.conv_in.bias"] = (top,)
    for j in range(nres):
        res(f"decoder.mid_block.{j}", top, top)
    for lvl in range(len(mult)):
        c_in = ch * mult[min(lvl + 1, len(mult) - 1)]  # width arriving from the level above
        co = ch * mult[lvl]
        for name in ("gamma", "beta"):
            shapes[f"decoder.adaptive.{lvl}.{name}.weight"] = (c_in, z)
            shapes[f"decoder.adaptive.{lvl}.{name}.bias"] = (c_in,)
        for b in range(nres):
            res(f"decoder.up.{lvl}.block.{b}", c_in if b == 0 else co, co)
        if lvl > 0:
            shapes[f"decoder.up.{lvl}.upsample.conv1.weight"] = (4 * co, co, 3, 3)
            shapes[f"decoder.up.{lvl}.upsample.conv1.bias"] = (4 * co,)
    gn("decoder.norm_out", ch * mult[0])
    shapes["decoder.conv_out.weight"] = (config.out_channels, ch * mult[0], 3, 3)
    shapes["decoder.conv_out.bias"] = (config.out_channels,)
    if config.quantizer == "vq":
        qc = config.quantizer_config()
        shapes["quantize.codebook"] = (qc.num_groups, qc.codebook_size, qc.group_size)
    return shapes


def random_official_state_dict(
    config: TokenizerConfig, generator: torch.Generator | None = None, scale: float = 0.02
) -> dict[str, torch.Tensor]:
    """A random state dict in the official key layout (tests, converters); GN weights are 1."""
    out = {}
    for k, shape in official_key_shapes(config).items():
        t = torch.randn(shape, generator=generator) * scale
        if ".norm" in k and k.endswith(".weight"):
            t = t + 1.0
        out[k] = t
    return out


def default_group_size(z_channels: int) -> int:
    """Bits per entropy group when a file does not say: 8 (the official 4 x 8 for 32 bits), else one group."""
    return 8 if z_channels % 8 == 0 else z_channels


def official_ae_config(config: TokenizerConfig) -> dict:
    """Our config as the official `ae_config.json` (the kwargs of the official `VQModel`).

    A group size other than the default is kept as `num_codebooks` (WeTok's name for the number of groups), so that
    it survives a save/load round trip. Only then: the official pipeline calls `VQModel(**ae_config)`, which takes
    no such keyword, so a default file stays exactly the official one.
    """
    ddconfig = {
        "ch": config.ch,
        "out_ch": config.out_channels,
        "in_channels": config.in_channels,
        "num_res_blocks": config.num_res_blocks,
        "z_channels": config.z_channels,
        "ch_mult": list(config.ch_mult),
        "resolution": config.resolution,
        "double_z": False,
    }
    out = {"ddconfig": ddconfig, "gan_decoder": config.gan_decoder}
    if config.group_size != default_group_size(config.z_channels):
        out["num_codebooks"] = config.z_channels // config.group_size
    return out


def config_from_official(ae_config: dict, source: str = "ae_config.json") -> TokenizerConfig:
    """Official `{"ddconfig": {...}, "gan_decoder": ...}` -> TokenizerConfig (binary; `num_codebooks` groups when
    the file has that key, else the default group size)."""
    dd = ae_config.get("ddconfig") if isinstance(ae_config, dict) else None
    if not isinstance(dd, dict):
        raise UserError(f"{source} has no 'ddconfig' object; is it an official BitDance ae_config.json?")
    try:
        z = int(dd["z_channels"])
        groups = int(ae_config.get("num_codebooks", 0)) or z // default_group_size(z)
        return TokenizerConfig(
            in_channels=int(dd.get("in_channels", 3)),
            out_channels=int(dd.get("out_ch", 3)),
            ch=int(dd["ch"]),
            ch_mult=tuple(int(m) for m in dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            z_channels=z,
            gan_decoder=bool(ae_config.get("gan_decoder", False)),
            group_size=z // groups,
            resolution=int(dd.get("resolution") or 256),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: ddconfig is missing or has a bad field: {e}")


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> TokenizerConfig:
    """Rebuild the architecture from official tensor shapes (binary quantizer, groups of 8 bits)."""

    def get(key):
        if key not in state:
            raise UserError(f"{source} is not an official BitDance tokenizer: no {key}")
        return state[key]

    ch, in_channels = get("encoder.conv_in.weight").shape[:2]
    levels = 1 + max(
        (int(k.split(".")[2]) for k in state if k.startswith("encoder.down.") and k.split(".")[2].isdigit()),
        default=-1,
    )
    nres = sum(1 for k in state if k.startswith("encoder.down.0.block.") and k.endswith(".conv1.weight"))
    if levels < 1 or nres < 1:
        raise UserError(f"{source} is not an official BitDance tokenizer: no encoder.down.0.block.0")
    mult = tuple(get(f"encoder.down.{i}.block.0.conv1.weight").shape[0] // ch for i in range(levels))
    z = get("encoder.conv_out.weight").shape[0]
    gan = get("decoder.conv_in.weight").shape[1] == 2 * z
    out_channels = get("decoder.conv_out.weight").shape[0]
    vq = "quantize.codebook" in state
    group_size = state["quantize.codebook"].shape[-1] if vq else default_group_size(z)
    return TokenizerConfig(
        in_channels=int(in_channels), out_channels=int(out_channels), ch=int(ch), ch_mult=mult,
        num_res_blocks=nres, z_channels=int(z), gan_decoder=bool(gan),
        quantizer="vq" if vq else "binary", group_size=int(group_size),
    )  # fmt: skip


def preset_name(config: TokenizerConfig) -> str | None:
    """The preset whose architecture equals `config` (resolution and quantizer aside), if any."""
    arch = ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels", "gan_decoder")
    for name, fn in TOKENIZER_PRESETS.items():
        p = fn()
        if all(getattr(p, a) == getattr(config, a) for a in arch):
            return name
    return None


def _strip_official_prefixes(state: dict, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source} does not hold a state dict of tensors")
    state = strip_wrapper_prefixes(state)  # a DDP / torch.compile training run's file
    if any(k.startswith("vae.") for k in state):  # a whole ImageNet BitDance model: keep its tokenizer
        state = {k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}
    # A training checkpoint also carries its losses' weights (discriminator, LPIPS); the official sampler loads
    # with strict=False for that reason. Keys outside the autoencoder's own modules are set aside, with a note;
    # the encoder's and decoder's keys are still checked strictly.
    outside = sorted({k.split(".")[0] for k in state} - set(TOKENIZER_MODULES))
    if outside:
        log.warning("%s: ignoring keys outside the tokenizer (%s.*)", source, ".*, ".join(outside))
        state = {k: v for k, v in state.items() if k.split(".")[0] in TOKENIZER_MODULES}
    # The official quantizer's buffers (codebook, masks) are non-persistent, not weights: drop any that
    # slipped in. Only our VQ tokenizer has a (G, 2^g, g) `quantize.codebook` parameter.
    book = state.get("quantize.codebook")
    vq = book is not None and book.ndim == 3
    return {k: v for k, v in state.items() if vq or not k.startswith("quantize.")}


def read_official_tokenizer(path: str | os.PathLike) -> tuple[dict, TokenizerConfig | None, str]:
    """(state dict, config from a JSON file or None, source description) for any official tokenizer file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer checkpoint not found: {path}")
    config_path = weights_path = None
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors"))
        pts = sorted(list(path.glob("*.pt")) + list(path.glob("*.pth")) + list(path.glob("*.ckpt")))
        if (path / OFFICIAL_WEIGHTS_NAME).is_file():
            weights_path = path / OFFICIAL_WEIGHTS_NAME
        elif len(weights) == 1:
            weights_path = weights[0]
        elif not weights and len(pts) == 1:
            return read_official_tokenizer(pts[0])
        elif len(weights) > 1:  # e.g. the HF BitDance-Tokenizer folder: several tokenizers side by side
            names = ", ".join(w.name for w in weights)
            raise UserError(f"{path} holds several tokenizers ({names}) and no {OFFICIAL_WEIGHTS_NAME}: pass the "
                            "one you want (its .safetensors or _config.json file)")
        else:
            raise UserError(f"{path} has no {OFFICIAL_WEIGHTS_NAME} (or a single .safetensors / .pt file)")
    elif path.suffix == ".json":
        config_path = path
        stem = path.name[: -len("_config.json")] if path.name.endswith("_config.json") else path.stem
        for cand in (path.parent / f"{stem}.safetensors", path.parent / OFFICIAL_WEIGHTS_NAME):
            if cand.is_file():
                weights_path = cand
                break
        if weights_path is None:
            raise UserError(f"no weights next to {path}: no {stem}.safetensors or {OFFICIAL_WEIGHTS_NAME}")
    elif path.suffix == ".safetensors":
        weights_path = path
    elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        obj = load_checkpoint(path, official_args=True)  # a whole official model file holds an `args` Namespace
        if isinstance(obj, dict):
            # EMA first, as tokenizer samplers load a training checkpoint; but in a whole BitDance generator file
            # the tokenizer is frozen, so `model` holds it exactly (the EMA copy went through every EMA update)
            model = obj.get("model")
            whole = isinstance(model, dict) and any(str(k).startswith("vae.") for k in strip_wrapper_prefixes(model))
            for key in ("model",) if whole else ("state_dict", "ema", "model"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        return _strip_official_prefixes(obj, str(path)), None, str(path)
    else:
        raise UserError(f"unsupported tokenizer file {path}: expected a folder, .safetensors, .json or .pt")

    if config_path is None:
        stem = weights_path.stem
        for cand in (weights_path.parent / f"{stem}_config.json", weights_path.parent / OFFICIAL_CONFIG_NAME):
            if cand.is_file():
                config_path = cand
                break
    config = config_from_official(read_json(config_path), str(config_path)) if config_path else None
    state = _strip_official_prefixes(read_safetensors(weights_path), str(weights_path))
    return state, config, str(weights_path)


def save_official(model: ImageTokenizer, directory: str | os.PathLike) -> Path:
    """Write `ae_config.json` + `ae.safetensors` in the official layout (binary tokenizers)."""
    from safetensors.torch import save_file

    if model.config.quantizer != "binary":
        raise UserError("only binary tokenizers have an official layout; save a VQ one with save_pretrained")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(official_ae_config(model.config), directory / OFFICIAL_CONFIG_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / OFFICIAL_WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp))
    return directory
