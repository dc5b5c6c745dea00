import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from bitdance.utils import (
    PretrainedMixin,
    StepBoundaryInterrupt,
    UserError,
    atomic_path,
    copy_file_atomic,
    cosine_lr,
    ensure_output_dir,
    find_resume_checkpoint,
    get_logger,
    load_checkpoint,
    save_checkpoint,
    update_ema,
)


def test_checkpoint_roundtrip_and_weights_only(tmp_path):
    state = {"model": {"w": torch.randn(3)}, "step": 7, "config": {"lr": 1e-3}}
    save_checkpoint(state, tmp_path / "ckpt.pt")
    back = load_checkpoint(tmp_path / "ckpt.pt")
    assert back["step"] == 7 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert not list(tmp_path.glob(".*tmp"))  # temp file renamed away


def test_foreign_objects_are_refused_unless_reading_official_args(tmp_path):
    import argparse
    import pathlib

    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module: code to import
    with pytest.raises(UserError, match="module.pt"):
        load_checkpoint(tmp_path / "module.pt")
    # an official file: its args Namespace is read, any other global inside becomes an inert placeholder
    args = argparse.Namespace(lr=1e-4, results_dir=pathlib.PurePosixPath("/x"))
    torch.save({"ema": {"w": torch.ones(2)}, "args": args}, tmp_path / "official.pt")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "official.pt")
    back = load_checkpoint(tmp_path / "official.pt", official_args=True)
    assert back["args"].lr == 1e-4 and "not loaded" in repr(back["args"].results_dir)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("good")
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert target.read_text() == "good"
    assert list(tmp_path.iterdir()) == [target]


def test_load_checkpoint_errors_are_user_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for path in (bad, tmp_path / "missing.pt"):
        try:
            load_checkpoint(path)
        except UserError as e:
            assert str(path.name) in str(e)
        else:
            raise AssertionError("expected UserError")


def test_ema_and_lr():
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    update_ema(ema, model, decay=0.0)
    assert torch.equal(ema.weight, model.weight)
    assert cosine_lr(0, 1.0, warmup=10, total=100) == 0.1
    assert abs(cosine_lr(100, 1.0, warmup=10, total=100, min_lr=0.1) - 0.1) < 1e-9


@dataclass
class TinyConfig:
    width: int = 64  # large enough for the weights, not the file's header, to set its size


class TinyNet(nn.Module, PretrainedMixin):
    """A matrix, a conv kernel and vectors: every kind of tensor save_pretrained stores differently."""

    config_class = TinyConfig

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.width, config.width)
        self.conv = nn.Conv2d(config.width, 4, 3)
        self.norm = nn.LayerNorm(config.width)


def test_save_pretrained_half_precision_loads_back_as_fp32(tmp_path):
    net = TinyNet(TinyConfig())
    net.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full = (tmp_path / "full")
    net.save_pretrained(full)
    back = TinyNet.from_pretrained(tmp_path / "half")
    assert back.lin.weight.dtype == torch.float32
    assert torch.equal(back.lin.weight, net.lin.weight.half().float())
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size


def test_save_pretrained_int8_rounds_each_matrix_row_and_loads_back_as_fp32(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    net = TinyNet(TinyConfig())
    with torch.no_grad():
        net.lin.weight[3] *= 100  # one large row must not coarsen the others' rounding
        net.conv.weight[1] = 0    # an all-zero row stays zero (no division by a zero scale)
    net.save_pretrained(tmp_path / "int8", dtype=torch.int8)
    net.save_pretrained(tmp_path / "half", dtype=torch.float16)
    stored = load_file(str(tmp_path / "int8" / "model.safetensors"))
    assert stored["lin.weight"].dtype == torch.int8 and stored["conv.weight"].dtype == torch.int8
    assert stored["lin.bias"].dtype == torch.float16 and stored["norm.weight"].dtype == torch.float16

    back = TinyNet.from_pretrained(tmp_path / "int8")
    assert back.lin.weight.dtype == torch.float32
    for name in ("lin.weight", "conv.weight"):
        ours, theirs = back.state_dict()[name].flatten(1), net.state_dict()[name].flatten(1)
        step = theirs.abs().amax(1, keepdim=True) / 127  # per output row
        assert ((ours - theirs).abs() <= step / 2 + 1e-7).all(), name
    assert (back.conv.weight[1] == 0).all()
    assert torch.equal(back.lin.bias, net.lin.bias.half().float())
    x = torch.randn(2, 64)
    assert torch.allclose(back.lin(x), net.lin(x), rtol=0.05, atol=0.05)
    int8_size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert int8_size < 0.7 * (tmp_path / "half" / "model.safetensors").stat().st_size

    # a file in a storage format this version does not know is refused by name, not loaded as garbage
    save_file(stored, str(tmp_path / "int8" / "model.safetensors"), metadata={"bitdance_storage": "int4-blocks"})
    with pytest.raises(UserError, match="stores its weights as 'int4-blocks'"):
        TinyNet.from_pretrained(tmp_path / "int8")


def test_resume_prefers_the_out_folders_own_checkpoint(tmp_path):
    """--resume starts a run; once that run has saved, rerunning the same command goes on from its own save."""
    start, out = tmp_path / "start", tmp_path / "out"
    start.mkdir()
    out.mkdir()
    save_checkpoint({"step": 3}, start / "checkpoint.pt")
    assert find_resume_checkpoint(None, out) is None
    assert find_resume_checkpoint(start, out) == start / "checkpoint.pt"  # a run folder or a file
    assert find_resume_checkpoint(start / "checkpoint.pt", out) == start / "checkpoint.pt"
    save_checkpoint({"step": 5}, out / "checkpoint.pt")
    assert find_resume_checkpoint(start, out) == out / "checkpoint.pt"
    assert find_resume_checkpoint(None, out) == out / "checkpoint.pt"
    with pytest.raises(UserError, match="no checkpoint"):
        find_resume_checkpoint(tmp_path / "missing", out)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_plain_file_permissions(tmp_path, umask, mode):
    """mkstemp creates 0600 files; a saved model or image must get what the user's umask gives any new file."""
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        assert os.umask(umask) == umask  # atomic_path left the umask alone
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_a_saved_model_gets_plain_file_permissions(tmp_path):
    """safetensors writes its files 0600 whatever the umask; a model folder must be readable like any other."""
    from safetensors.torch import save_file

    with atomic_path(tmp_path / "m.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    with atomic_path(tmp_path / "plain.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_atomic_path_never_touches_the_process_umask(tmp_path, monkeypatch):
    """Setting and restoring the umask per write races with other threads creating files; the kernel applies it."""
    def no_umask(*args):
        raise AssertionError("atomic_path called os.umask")

    monkeypatch.setattr(os, "umask", no_umask)
    with atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "f.txt").read_text() == "x"


def test_unwritable_outputs_name_the_users_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create the output folder"):
        ensure_output_dir(tmp_path / "file" / "out.png")
    with pytest.raises(UserError, match="cannot create the output folder"):
        with atomic_path(tmp_path / "file" / "out.png"):
            pass


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # f.write: no filename
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, capsys, failure):
    """A write that fails midway (torch.save reports it as a RuntimeError) is a UserError naming the user's path;
    the old file stays and no temp file is left; the CLI prints it as one line."""
    from bitdance.cli import report_errors

    target = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, target)

    def full_disk(obj, path):
        Path(path).write_bytes(b"half")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=f"cannot write {target}"):
        save_checkpoint({"step": 2}, target)
    assert load_checkpoint(target)["step"] == 1 and sorted(tmp_path.iterdir()) == [target]
    assert report_errors(lambda: save_checkpoint({"step": 2}, target)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bitdance: error: cannot write {target}") and "\n" not in err


def test_a_full_disk_under_safetensors_is_one_line_too(tmp_path, monkeypatch):
    """Model exports and token caches write through safetensors, whose I/O failure is not an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    from bitdance.data import write_token_cache

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(UserError, match="cannot write .*model.safetensors: Error while serializing: I/O error"):
        write_token_cache(tmp_path / "model.safetensors", torch.zeros(1), torch.zeros(1), "key", "source")
    assert list(tmp_path.iterdir()) == []


def test_an_unrelated_runtime_error_inside_a_write_is_not_called_a_full_disk(tmp_path, monkeypatch):
    def broken(obj, path):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        save_checkpoint({"step": 1}, tmp_path / "c.pt")


def test_a_scripts_failed_child_command_is_one_line(capsys):
    """scripts/ run their main through report_errors: the child printed its reason, the script adds one line."""
    import subprocess
    import sys

    from bitdance.cli import report_errors

    command = [sys.executable, "-c", "raise SystemExit(3)"]
    assert report_errors(lambda: subprocess.run(command, check=True), "some_script.py") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("some_script.py: error: exit status 3 from ") and "\n" not in err

def test_an_error_about_another_file_inside_an_atomic_write_keeps_its_own_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        copy_file_atomic(tmp_path / "missing.txt", tmp_path / "copy.txt")
    assert list(tmp_path.iterdir()) == []

def test_unreadable_weight_files_give_one_clear_error(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pt"):
        load_checkpoint(tmp_path / "empty.pt")

    model = TinyNet(TinyConfig())
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # a download or copy cut short
    with pytest.raises(UserError, match="model.safetensors"):
        TinyNet.from_pretrained(tmp_path / "model")


def test_ctrl_c_waits_for_the_step_boundary_and_a_second_one_does_not(capsys, monkeypatch):
    clock = [100.0]  # time.monotonic, moved by hand: each press below is a second after the one before
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def press():
        clock[0] += 1.0
        signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    interrupt = StepBoundaryInterrupt().install()
    try:
        interrupt.begin_step()
        press()  # inside the update: noted, and said
        assert interrupt.requested and not interrupt.at_boundary
        assert "stopping after this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            interrupt.end_step()  # the step's end
        assert interrupt.at_boundary and interrupt.together  # every rank stops here: they may wait for the save

        outside = StepBoundaryInterrupt().install()
        with pytest.raises(KeyboardInterrupt):
            press()  # between steps: at once, state whole
        assert outside.at_boundary and not outside.together  # each rank on its own: no barrier
        outside.restore()

        saving = StepBoundaryInterrupt().install()
        finished = False
        with pytest.raises(KeyboardInterrupt):
            with saving.deferred():  # saving or sampling, a lazy import among them: not cut off halfway
                press()
                finished = True
        assert finished and saving.at_boundary and saving.together
        saving.restore()

        twice = StepBoundaryInterrupt().install()
        twice.begin_step()
        press()
        signal.raise_signal(signal.SIGINT)  # the same press forwarded by torchrun a moment later: ignored
        assert twice.requested and twice.in_step
        with pytest.raises(KeyboardInterrupt):
            press()  # pressed again inside the step: now, nothing to save
        assert not twice.at_boundary
        twice.restore()
    finally:
        interrupt.restore()
    assert signal.getsignal(signal.SIGINT) is before
    quiet = StepBoundaryInterrupt()
    quiet.begin_step()
    quiet.end_step()  # nothing pressed: no-op


def test_other_ranks_print_only_what_they_alone_know_tagged_with_their_rank(capsys):
    logger = get_logger(is_main=False, name="bitdance.test_rank", rank=3)
    logger.info("step 10: loss 0.3")
    logger.warning("a warning every rank gives (the main rank prints it)")
    logger.warning("skipping a.png (1 skipped so far)", extra={"rank_local": True})
    err = capsys.readouterr().err
    assert "rank 3] skipping a.png" in err and "loss" not in err and "every rank" not in err


def test_step_seeds_differ_between_ranks_and_steps_and_do_not_depend_on_anything_else():
    from bitdance.utils import DistInfo, step_seed

    for world in (1, 2, 4):  # within one world size: no two (seed, rank, step) share noise
        seeds = {step_seed(seed, DistInfo(rank=r, world_size=world), step)
                 for seed in (0, 1, 2) for r in range(world) for step in range(50)}
        assert len(seeds) == 3 * world * 50
    assert step_seed(3, DistInfo(rank=1, world_size=2), 7) == step_seed(3, DistInfo(rank=1, world_size=2), 7)
