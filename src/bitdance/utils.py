"""Shared plumbing: devices and precision, atomic checkpoints, pretrained export, distributed set-up, logging.

Library code stays device-agnostic: nothing here moves tensors to CUDA on its own, and no global
torch flags are set at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class UserError(Exception):
    """A problem with the user's input (path, checkpoint, flag). The CLI prints it as one line."""


# ----------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)  # absent from some builds
    return mps is not None and mps.is_available()


def resolve_device(name: str | None = None) -> torch.device:
    """`name` if given, else cuda, then mps, then cpu. A device this machine lacks is a UserError, not a traceback."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise UserError(f"unknown device {name!r} ({first_line(e)})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.type == "mps" and not _mps_available():
            raise UserError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_training_dtype(name: str) -> torch.dtype:
    """The autocast dtype of a training run: float16 is refused, as it needs loss scaling the trainers do not do."""
    dtype = resolve_dtype(name)
    if dtype == torch.float16:
        raise UserError("--dtype float16 is for sampling only: training in fp16 needs loss scaling, which the "
                        "trainers do not do; train in bfloat16 (GPU) or float32")
    return dtype


def autocast(device: torch.device, dtype: str | torch.dtype = "float32"):
    """Autocast for bf16/fp16, a no-op context for fp32 (the CPU default)."""
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def random_on(kind: str, shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """torch.randn ("normal") or torch.rand ("uniform") drawn where `generator` lives, then moved to `device`.

    So a CPU generator can drive a CUDA model (as in diffusers) and a seed gives the same numbers on any device.
    """
    draw = {"normal": torch.randn, "uniform": torch.rand}[kind]
    source = generator.device if generator is not None else device
    return draw(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def fp32_island(device_type: str = "cpu"):
    """Disable autocast: quantizers, entropy losses, the per-bit head and the flow's noise draws run in fp32."""
    return torch.autocast(device_type=device_type, enabled=False)


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, pretrained folders
# ----------------------------------------------------------------------------------------------


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters ('' for an empty message)."""
    return (str(error).splitlines() or [""])[0][:limit]


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the folder `path` will be written to, or raise a UserError naming it.

    Commands call it before long work (sampling, evaluation), so an unwritable --out fails in a second, not after.
    """
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, a read-only file system
        raise UserError(f"cannot create the output folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"the output folder {parent} is not writable")
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    The temp file is flushed to disk before the rename, so a power loss leaves the old file or the new one, never
    an empty one. It is created with os.open(0o666) rather than mkstemp (always 0600), so the kernel applies the
    umask and the result has the permissions of a plainly created file, with no umask read-and-restore that
    another thread could see. A failed write (a full disk) is a UserError naming `path`.
    """
    path = Path(path)
    ensure_output_dir(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
    except OSError as e:  # name the file the user asked for, not our hidden temp name
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o777 != mode:  # the writer made a file of its own (safetensors' is 0600)
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:
        if not _is_write_failure(e, tmp):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise UserError(f"cannot write {path}: {reason}") from None  # the user's file, not our temp name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _is_write_failure(e: Exception, tmp: Path) -> bool:
    """Whether `e` says that writing `tmp` failed (a full disk, a quota), as each writer reports it: an OSError
    about that file (f.write's ENOSPC has no file name), torch.save's zip writer ("inline_container"),
    safetensors' "I/O error". An error naming another file (the source of a copy) is about that file."""
    if isinstance(e, OSError):
        return e.filename is None or str(e.filename) == str(tmp)
    text = str(e)
    return (isinstance(e, RuntimeError) and "inline_container" in text) or (
        type(e).__name__ == "SafetensorError" and "I/O error" in text)


def copy_file_atomic(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy `source` over `dest` so that a reader of `dest` sees the old file or the new one, never half of one."""
    import shutil

    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
    return Path(dest)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save a dict of tensors and plain Python values atomically (loadable with weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class _Placeholder:
    """Stands in for a non-tensor object of a foreign checkpoint (inside `args`): nothing is imported or run."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname} (not loaded)>"


def _placeholders(path: Path) -> list:
    """(stand-in class, "module.Name") for every global the file's pickle would import, except Namespace."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        names = finder(str(path))
    except Exception:  # not a zip checkpoint: torch.load reports it
        return []
    return [(type(name.rpartition(".")[2], (_Placeholder,), {"qualname": name, "__module__": __name__}), name)
            for name in names if name != "argparse.Namespace"]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False,
                    official_args: bool = False) -> dict:
    """Load a training checkpoint or any foreign .pt file safely (weights_only=True: no code from the file runs).

    official_args: the file may be an official checkpoint, whose training flags are stored as `args`, an
    argparse.Namespace, which weights_only refuses: Namespace is allowlisted (it only holds the flag values), and
    any other global the pickle names (a Path inside args, say) is replaced by an inert placeholder instead of
    being imported. Off, such a file is refused, as any object that is not tensors and plain types. mmap
    memory-maps the tensors of a zip checkpoint (a multi-GB file then costs little RAM).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        allowed = [argparse.Namespace, *_placeholders(path)] if official_args else []
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # pickle errors, truncated files, non-torch files
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line(e)}") from e


def file_stat_key(path: Path, name: str | None = None) -> str:
    """`name|size|mtime` (name defaults to the path), read by stat alone (`name|unreadable` if that fails): what
    the caches key a file on."""
    name = str(path) if name is None else name
    try:
        st = path.stat()
    except OSError:
        return f"{name}|unreadable"
    return f"{name}|{st.st_size}|{st.st_mtime_ns}"


def files_fingerprint(files, root: str | os.PathLike) -> str:
    """A cheap key for a set of files under `root` (relative names, sizes, modification times; nothing is read),
    so a cache or a resumed job keyed on it notices files rewritten in place."""
    root, h = Path(root), hashlib.sha256()
    for f in map(Path, files):
        name = f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)
        h.update(file_stat_key(f, name).encode() + b"\n")
    return h.hexdigest()[:16]


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON in {path}: {e}")


def config_from_dict(cls: type, d: dict):
    """Build dataclass `cls` from a dict, ignoring unknown keys and restoring tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k in fields:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Weight-only int8 storage (save_pretrained(dtype=torch.int8)): the safetensors metadata names the format, and
# each quantized tensor NAME has its per-row float32 scales under NAME + INT8_SCALE_SUFFIX.
STORAGE_KEY, INT8_STORAGE, INT8_SCALE_SUFFIX = "bitdance_storage", "int8-rowwise", "#int8_scale"


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices, embeddings and conv kernels -> int8 with one absmax scale per output row (a quarter of fp32);
    vectors (biases, norms) -> float16, where rounding a whole row to 8 bits would cost more than it saves."""
    out = {}
    for name, value in state.items():
        if not value.is_floating_point() or value.ndim < 2:
            out[name] = (value.half() if value.is_floating_point() else value).contiguous()
            continue
        rows = value.detach().float().flatten(1)                             # (out, fan_in)
        scale = rows.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        out[name] = torch.round(rows / scale[:, None]).to(torch.int8).view(value.shape).contiguous()
        out[name + INT8_SCALE_SUFFIX] = scale
    return out


def dequantize_int8(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of quantize_int8, in float32 (up to its rounding: half a scale step per weight)."""
    out = {}
    for name, value in stored.items():
        if name.endswith(INT8_SCALE_SUFFIX):
            continue
        scale = stored.get(name + INT8_SCALE_SUFFIX)
        if scale is None:
            out[name] = value.float() if value.is_floating_point() else value
        else:
            out[name] = (value.float().flatten(1) * scale[:, None]).view(value.shape)
    return out


class PretrainedMixin:
    """`save_pretrained(dir)` / `from_pretrained(dir)` with config.json + model.safetensors.

    A subclass sets `config_class` (a dataclass) and takes the config as its only constructor
    argument. Loading is strict and fully offline.
    """

    config_class: type

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors. `dtype` (e.g. torch.float16) stores floating-point weights at
        that precision to halve the files; torch.int8 stores matrices as 8-bit integers with per-row scales
        (quantize_int8; lossy, for a model whose exact weights matter little, such as a guide). `from_pretrained`
        casts them back to the model's dtype."""
        from safetensors.torch import save_file, save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json({"_class_name": type(self).__name__, **asdict(self.config)}, directory / CONFIG_NAME)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            if dtype is None:
                save_model(self, str(tmp))
            elif dtype == torch.int8:
                save_file(quantize_int8(self.state_dict()), str(tmp), metadata={STORAGE_KEY: INT8_STORAGE})
            else:
                state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                         for k, v in self.state_dict().items()}
                save_file(state, str(tmp))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"):
        from safetensors import safe_open
        from safetensors.torch import load_model

        directory = Path(directory)
        weights = directory / WEIGHTS_NAME
        if not (directory / CONFIG_NAME).is_file() or not weights.is_file():
            raise UserError(f"{directory} is not a saved {cls.__name__} (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        raw = read_json(directory / CONFIG_NAME)
        saved = raw.get("_class_name")
        if saved is not None and saved != cls.__name__:
            raise UserError(f"{directory} holds a {saved}, not a {cls.__name__}")
        model = cls(config_from_dict(cls.config_class, raw))
        try:
            with safe_open(str(weights), "pt") as f:  # the header names the storage format
                storage = (f.metadata() or {}).get(STORAGE_KEY)
                stored = {k: f.get_tensor(k) for k in f.keys()} if storage == INT8_STORAGE else None
            if stored is not None:
                model.load_state_dict(dequantize_int8(stored), strict=True)
            elif storage is not None:
                raise UserError(f"{weights} stores its weights as {storage!r}, which this version cannot read")
            else:
                load_model(model, str(weights), strict=True, device=str(device))
        except RuntimeError as e:
            raise UserError(f"weights in {directory} do not match its config: {first_line(e, 300)}")
        except UserError:
            raise
        except Exception as e:  # a truncated or foreign file: safetensors raises its own SafetensorError
            raise UserError(f"cannot read {weights}: {type(e).__name__}: {first_line(e)}")
        return model.to(device).eval()


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file on the CPU; a missing, truncated or foreign file is a UserError."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # header errors, truncated files: safetensors raises its own SafetensorError
        raise UserError(f"cannot read safetensors file {path}: {type(e).__name__}: {first_line(e)}")


def strip_wrapper_prefixes(state: dict) -> dict:
    """Keys without the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes a wrapped model saves with."""
    wrappers = ("module.", "_orig_mod.")
    out = {}
    for key, value in state.items():
        while isinstance(key, str) and key.startswith(wrappers):
            key = key.removeprefix("module.").removeprefix("_orig_mod.")
        out[key] = value
    return out


def check_state_shapes(expected: dict[str, tuple[int, ...]] | nn.Module, state: dict, source: str, what: str) -> None:
    """UserError naming up to three missing / unexpected / mis-shaped keys of `state` against `expected`.

    `expected` is a {key: shape} mapping or a module (meta-device modules work: only shapes are read).
    """
    if isinstance(expected, nn.Module):
        expected = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, expected {v}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{source} does not match {what}: {'; '.join(problems[:3])}{more}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------


def ema_decay_at(base: float, step: int) -> float:
    """The EMA decay at `step`, warmed up as min(base, (1 + step) / (10 + step)) (0.1 at step 0).

    Short CPU runs: a fixed 0.999 would still be mostly the random init after a few thousand steps.
    """
    return min(base, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def check_finite(step: int, info: DistInfo | None = None, **values: torch.Tensor) -> None:
    """Stop a run with a clear message instead of training on NaNs.

    Call it before the optimizer step with the step's loss and gradient norm (`loss=..., gradient_norm=...`): a
    NaN gradient under a finite loss would otherwise write NaN weights, which the next checkpoint would keep.
    Under DDP pass `info`: the ranks agree first (one all-reduce of a flag per value), so a NaN on one rank
    stops all of them together instead of leaving the others waiting in the next all-reduce.
    """
    names = list(values)
    bad = ~torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in values.values()]))  # (len,)
    anywhere = bad.float()
    if info is not None and info.enabled:
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    if bool(anywhere.any()):  # the one host sync of a healthy step
        local, flags = bad.tolist(), anywhere.tolist()
        what = ", ".join(f"{n.replace('_', ' ')} is {float(values[n].detach()):g}" if mine
                         else f"{n.replace('_', ' ')} is not finite on another rank"
                         for n, mine, anyone in zip(names, local, flags) if anyone)
        raise FloatingPointError(f"{what} at step {step}; stopping. The last checkpoint is kept. Try a lower "
                                 "learning rate or --dtype float32.")


class StepBoundaryInterrupt:
    """Ctrl-C inside a training step takes effect at the end of the step; outside one, at once.

    A KeyboardInterrupt raised inside a step (in `opt.step()`, or between the weights' update and the EMA's)
    would leave a half-applied update for the interrupt checkpoint to save, and the resumed run would not be the
    run it continues. The loop brackets each update with `begin_step()` / `end_step()`: a Ctrl-C in between
    only sets `requested` (and says so), and `end_step()` raises KeyboardInterrupt; saving and sampling run in
    `deferred()`, which holds a Ctrl-C the same way; one anywhere else (between steps) raises at once. Either way
    `at_boundary` is set and the state is safe to save. A second Ctrl-C inside the step (or the deferred block)
    interrupts at once, `at_boundary` False: save nothing. Under DDP `end_step` lets the
    ranks agree, so all stop after the same step. Where SIGINT is ignored (a background job) or cannot be
    handled (not the main thread) it changes nothing.

    A SIGINT within `REPEAT_WINDOW_S` of the one before is the same Ctrl-C delivered twice, and is ignored: a
    terminal signals the whole process group, so under torchrun each worker gets the key press and, a moment
    later, the agent's forwarded copy, which would otherwise count as a second press and abort the save.
    """

    REPEAT_WINDOW_S = 0.5  # a person does not press Ctrl-C twice this fast; torchrun forwards within milliseconds

    def __init__(self, info: DistInfo | None = None):
        self.info = info
        self.requested = self.at_boundary = self.in_step = self.together = False
        self._installed, self._previous = False, None
        self._last_signal = -math.inf

    def install(self) -> StepBoundaryInterrupt:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not \
                signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def restore(self) -> None:
        """Put the previous SIGINT handler back (call it in a `finally`)."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        now, last = time.monotonic(), self._last_signal
        self._last_signal = now
        if now - last < self.REPEAT_WINDOW_S:
            return  # the same Ctrl-C again (torchrun's forwarded copy)
        if self.in_step and not self.requested:
            self.requested = True
            print("\ninterrupted: stopping after this step (Ctrl-C again to stop at once, unsaved)",
                  file=sys.stderr, flush=True)
            return
        self.at_boundary = not self.in_step
        raise KeyboardInterrupt

    def begin_step(self) -> None:
        self.in_step = True

    def end_step(self) -> None:
        """Leave the step; raise KeyboardInterrupt (at the boundary) if Ctrl-C came during it, on any rank."""
        self.in_step = False
        if any_rank(self.requested, self.info):
            self.at_boundary = self.together = True  # every rank raises here, at this step: they may barrier
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Hold a Ctrl-C until the block (saving, sampling, evaluating; on every rank) has finished, as inside a
        step: a KeyboardInterrupt raised in the middle of a lazy import (matplotlib's, at the first loss-curve
        plot) leaves the module half-imported in sys.modules, and the interrupt save that follows fails on it.
        A Ctrl-C in the block costs a second save of the same step."""
        self.begin_step()
        yield
        self.end_step()

    def save_on_interrupt(self, save, step: int, logger) -> None:
        """The trainers' `except KeyboardInterrupt:` body: rank 0 saves a whole state (`save(step)`), or says why
        not; when every rank stopped at the same step, the others wait for that save instead of exiting (torchrun
        would tear rank 0 down mid-save)."""
        if self.info is None or self.info.is_main:
            if not self.at_boundary:
                logger.info("interrupted inside a step: nothing saved, the last checkpoint is kept")
            elif step > 0:
                save(step)
                logger.info("interrupted: checkpoint saved at step %d", step)
        if self.together:
            barrier(self.info)


def any_rank(flag: bool, info: DistInfo | None) -> bool:
    """`flag` on this rank or any other (one all-reduce under DDP; no communication in a single process)."""
    if info is None or not info.enabled:
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def step_seed(seed: int, info: DistInfo, step: int) -> int:
    """Seed of a training step's random draws on this rank: a function of (seed, rank, step) alone, so a resumed
    run draws what the uninterrupted run would have, and no two ranks share noise."""
    return (seed * info.world_size + info.rank) * 1_000_003 + step


def batch_seed(seed: int, first_index: int) -> int:
    """Seed of the sampling batch whose first image has global index `first_index`: no two batches (of a run
    or of runs with other seeds below 1,000,003 images) share noise, and any batch can be redrawn alone."""
    return seed * 1_000_003 + first_index


def changed_fields(saved: dict, current, ignore: tuple[str, ...] = ()) -> list[str]:
    """Fields of the dataclass `current` whose value differs from the checkpoint's `saved` dict (JSON turned
    tuples into lists, so those compare equal); fields the checkpoint predates are not differences."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    mine = asdict(current)
    return [k for k in mine if k in saved and k not in ignore and plain(saved[k]) != plain(mine[k])]


def check_loop_options(steps: int, batch_size: int, world_size: int, save_every: int, log_every: int,
                       ema_decay: float, every: dict[str, int | None] | None = None) -> None:
    """The checks every training loop needs before it starts (a zero here would divide by zero much later).

    `every`: further "--flag": value intervals where 0 (or None) means off.
    """
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if batch_size < 1 or batch_size % world_size:
        raise UserError(f"--batch-size {batch_size} must be a positive multiple of the world size {world_size}")
    if save_every < 1 or log_every < 1:
        raise UserError("--save-every and --log-every must be at least 1")
    for flag, value in (every or {}).items():
        if value is not None and value < 0:
            raise UserError(f"{flag} must be at least 0 (0: off), got {value}")
    if not 0.0 <= ema_decay < 1.0:
        raise UserError(f"--ema must be in [0, 1), got {ema_decay}")


def find_resume_checkpoint(resume: str | os.PathLike | None, out: Path, name: str = "checkpoint.pt") -> Path | None:
    """The checkpoint to resume from: out/name if present, else `resume` (a file, or a run folder holding `name`).

    The out folder's own checkpoint wins: once a run started from `resume` has saved, rerunning the same command
    (after a crash, or after --stop-after) must go on from there, not start over from `resume`.
    """
    own = Path(out) / name
    if resume:
        p = Path(resume)
        p = p / name if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"--resume: no checkpoint at {p}")
        return own if own.is_file() else p
    return own if own.is_file() else None


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup to base_lr, then cosine decay to min_lr at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group, so cleanup_distributed ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """DDP when launched by torchrun (RANK in the environment), else a single process.

    CPU runs use the gloo backend, CUDA runs nccl with one GPU per local rank.
    """
    if "RANK" not in os.environ:
        return DistInfo(device=resolve_device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns_group = not dist.is_initialized()  # a caller's own group is left to the caller
    if owns_group:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, owns_group=owns_group)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup_distributed(info: DistInfo) -> None:
    """End the process group init_distributed created (also torchrun's one-process group, which DDP never uses)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Logging and images
# ----------------------------------------------------------------------------------------------


def get_logger(
    run_dir: str | os.PathLike | None = None, is_main: bool = True, name: str = "bitdance", rank: int = 0
) -> logging.Logger:
    """Log to stderr and run_dir/log.txt on the main rank; the other ranks print only their rank-local records."""
    logger = logging.getLogger(f"{name}.{run_dir}" if run_dir else name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not is_main:
        # quiet: the main rank says everything every rank would say, except what only this rank can know (an
        # image that failed to decode here), logged with extra={"rank_local": True}
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S"))
        stream.addFilter(lambda record: getattr(record, "rank_local", False))
        logger.addHandler(stream)
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / "log.txt")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


@contextlib.contextmanager
def run_logger(run_dir: str | os.PathLike, info: DistInfo, name: str):
    """A training run's logger (`get_logger` for this rank), with the data loader's warnings (unreadable files,
    by name) sent to the same places, log.txt included; on exit the files are closed and `bitdance.data` is
    restored."""
    logger = get_logger(run_dir if info.is_main else None, is_main=info.is_main, name=name, rank=info.rank)
    data_log = logging.getLogger("bitdance.data")
    saved = data_log.handlers, data_log.propagate
    data_log.handlers, data_log.propagate = list(logger.handlers), False
    try:
        yield logger
    finally:
        data_log.handlers, data_log.propagate = saved
        for handler in logger.handlers:
            handler.close()


class JsonlLog:
    """Append-only JSONL metrics log (losses.jsonl) written on the main rank.

    On resume, rows from beyond the checkpoint's step are dropped (they were logged after the last good save),
    as are lines cut short by a crash. `rows` keeps everything for plotting.
    """

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        self.rows: list[dict] = []
        if enabled and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= start_step:
                    self.rows.append(row)
            with atomic_path(self.path) as tmp:  # a crash here must not cost the history
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        if self.enabled:
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, the official mapping clamp(127.5 y + 128)."""
    x = (images.detach().float().cpu() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    row_labels: list[str] | None = None,
    padding: int = 2,
    scale: int = 1,
) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid, optionally with a text label per row."""
    from PIL import Image, ImageDraw

    arr = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = arr.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    label_w = 0
    if row_labels:
        label_w = 8 + 6 * max(len(s) for s in row_labels)
    grid = Image.new("RGB", (label_w + ncol * (w + padding) + padding, nrows * (h + padding) + padding), "white")
    for i in range(n):
        tile = arr[i].numpy()
        img = Image.fromarray(tile[..., 0], "L").convert("RGB") if c == 1 else Image.fromarray(tile, "RGB")
        r, col = divmod(i, ncol)
        grid.paste(img, (label_w + padding + col * (w + padding), padding + r * (h + padding)))
    if row_labels:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(row_labels[:nrows]):
            draw.text((4, padding + r * (h + padding) + h // 2 - 5), text, fill="black")
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def plot_curves(series: dict[str, list[tuple[int, float]]], path: str | os.PathLike, title: str = "") -> Path:
    """Save a matplotlib line plot of {name: [(step, value), ...]} (a loss curve, say)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure atomically (format from the suffix, PNG without one) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:  # the temp name has no suffix for matplotlib to read the format from
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    plt.close(fig)
    return path
