import torch
from torch import nn

from bitdance.utils import (
    UserError,
    atomic_path,
    cosine_lr,
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


def test_save_pretrained_half_precision_loads_back_as_fp32(tmp_path):
    from dataclasses import dataclass

    from bitdance.utils import PretrainedMixin

    @dataclass
    class Cfg:
        width: int = 4

    class Net(nn.Module, PretrainedMixin):
        config_class = Cfg

        def __init__(self, config):
            super().__init__()
            self.config = config
            self.lin = nn.Linear(config.width, config.width)

    net = Net(Cfg())
    net.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full = (tmp_path / "full")
    net.save_pretrained(full)
    back = Net.from_pretrained(tmp_path / "half")
    assert back.lin.weight.dtype == torch.float32
    assert torch.equal(back.lin.weight, net.lin.weight.half().float())
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size
