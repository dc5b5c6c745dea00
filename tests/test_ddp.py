"""DDP: `torchrun --nproc_per_node 2 -m bitdance.cli train` (gloo, CPU) trains like one process on the same
global batch. The bitwise head with no label dropout and no bit flips makes the loss deterministic, so the two
ranks' half batches must average to the single process's full-batch loss and gradients."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from bitdance.data import SyntheticImages
from bitdance.models.autoencoder import ImageTokenizer, TokenizerConfig
from bitdance.pipeline import BitDancePipeline
from bitdance.train import TrainConfig, run
from bitdance.utils import load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def rows(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def write_data_and_tokenizer(tmp_path) -> None:
    """8 class-folder images of 16x16 in tmp_path/data and a random tokenizer (8-bit tokens) in tmp_path/tok."""
    from PIL import Image

    ds = SyntheticImages(8, 16, 3, num_classes=4, seed=0)
    for i in range(8):
        d = tmp_path / "data" / ds.class_names[int(ds.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    torch.manual_seed(0)
    tok = ImageTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, resolution=16))
    tok.save_pretrained(tmp_path / "tok")


def test_two_ranks_match_one_process(tmp_path):
    write_data_and_tokenizer(tmp_path)
    flags = dict(tokenizer=str(tmp_path / "tok"), data=str(tmp_path / "data"), preset="tiny", parallel=4,
                 head="bitwise", class_dropout=0.0, perturb_rate=0.0, steps=3, batch_size=8, lr=1e-2, warmup=1,
                 log_every=1, save_every=100, sample_every=0, export_ema=False, progress=False, device="cpu")

    ddp_out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "bitdance.cli", "train", "--out", str(ddp_out), "--no-ema-export", "--no-progress"]
    for k in ("tokenizer", "data", "preset", "parallel", "head", "class_dropout", "perturb_rate", "steps",
              "batch_size", "lr", "warmup", "log_every", "save_every", "sample_every", "device"):
        argv += [f"--{k.replace('_', '-')}", str(flags[k])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((ddp_out / "config.json").read_text())["world_size"] == 2

    single_out = tmp_path / "single"
    run(TrainConfig(out=str(single_out), **flags))
    # each rank encoded its half; rank 0 joined the halves into the same cache one process writes
    from safetensors.torch import load_file

    assert not list(ddp_out.glob("tokens.part*"))
    joined, alone = load_file(ddp_out / "tokens.safetensors"), load_file(single_out / "tokens.safetensors")
    assert joined["codes"].shape[0] == 8 and all(torch.equal(joined[k], alone[k]) for k in ("codes", "labels"))

    ddp_rows, single_rows = rows(ddp_out), rows(single_out)
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == [1, 2, 3]
    assert ddp_rows[0]["loss"] == pytest.approx(single_rows[0]["loss"], rel=1e-5)  # the first step, exactly
    for a, b in zip(ddp_rows, single_rows):  # later steps: the averaged gradients gave the same updates
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (ddp_rows, single_rows)
    assert single_rows[-1]["loss"] < single_rows[0]["loss"]
    a = BitDancePipeline.from_pretrained(ddp_out).model.state_dict()
    b = BitDancePipeline.from_pretrained(single_out).model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_ctrl_c_in_a_terminal_under_torchrun_keeps_a_checkpoint_that_resumes(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group: torchrun's agent (which forwards it to the
    workers once more, then kills them after a timeout) and both ranks, wherever they are in a step. Whatever the
    moment, a whole checkpoint is left (no temp file) and the run resumes from it."""
    import signal
    import time

    write_data_and_tokenizer(tmp_path)
    out = tmp_path / "run"

    def launch(steps):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "bitdance.cli", "train", "--out", str(out), "--tokenizer", str(tmp_path / "tok"), "--data",
                str(tmp_path / "data"), "--preset", "tiny", "--parallel", "4", "--steps", str(steps), "--batch-size",
                "8", "--save-every", "3", "--sample-every", "0", "--no-progress", "--device", "cpu"]
        return subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    proc = launch(100_000)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():  # training is under way once the first save is there
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, log[-3000:]
    # rank 0 finished its interrupt save (torchrun's forwarded copy of the signal did not abort it), and the
    # checkpoint on disk is that save, not an earlier periodic one
    import re

    saved = re.search(r"interrupted: checkpoint saved at step (\d+)", log)
    assert saved, log[-3000:]
    assert not [f.name for f in out.iterdir() if "tmp" in f.name]
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert step == int(saved.group(1)) and step >= 3
    again = launch(step + 2)
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step + 2


def test_tokenizer_training_with_a_discriminator_two_ranks_match_one_process(tmp_path):
    """Tokenizer training with a discriminator under DDP: the LeCAM EMAs are the global batch's means on every
    rank (rank 0 saves them), not rank 0's half batch's."""
    from PIL import Image

    from bitdance.train_tokenizer import TokenizerTrainConfig
    from bitdance.train_tokenizer import run as run_tokenizer
    from bitdance.utils import load_checkpoint

    ds = SyntheticImages(8, 16, 3, num_classes=2, seed=0)
    for i in range(8):
        d = tmp_path / "data" / ds.class_names[int(ds.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    flags = dict(data=str(tmp_path / "data"), preset="tiny", steps=3, batch_size=8, lr=2e-3, warmup=1, log_every=1,
                 save_every=100, sample_every=0, eval_images=0, disc_weight=0.1, disc_start=0, device="cpu")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "bitdance.cli", "tokenizer", "train", "--out", str(tmp_path / "ddp"), "--no-progress"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_tokenizer(TokenizerTrainConfig(out=str(tmp_path / "single"), progress=False, **flags))
    a, b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"), load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    # close, not equal: the quantizer's batch-entropy term sees each rank's half batch (as in the official code),
    # and Adam turns those small gradient differences into lr-sized ones; rank 0's own half was 0.05 off
    assert [r["step"] for r in rows(tmp_path / "ddp")] == [1, 2, 3]
    for k in ("ema_real", "ema_fake"):
        assert abs(float(a["lecam"][k]) - float(b["lecam"][k])) < 2e-3, k
