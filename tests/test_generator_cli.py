"""`bitdance train` then `bitdance sample` (PNG grid and ADM .npz) end to end, and the error paths."""

import numpy as np
import pytest
import torch

import bitdance.pipeline as pl
from bitdance.cli import main
from bitdance.data import SyntheticImages
from bitdance.evaluation.npz import load_npz
from bitdance.models.autoencoder import ImageTokenizer, TokenizerConfig

CLASSES = ["circle", "diamond", "ring", "square"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train a tiny 4x generator for a few steps through the CLI; returns (run folder, tokenizer, data)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    ds = SyntheticImages(8, 16, 3, num_classes=4, seed=0)
    for i in range(8):
        d = root / "data" / ds.class_names[int(ds.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    torch.manual_seed(0)
    tok = ImageTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, resolution=16))
    tok.save_pretrained(root / "tok")
    out = root / "run"
    assert main(["train", "--tokenizer", str(root / "tok"), "--data", str(root / "data"), "--preset", "tiny",
                 "--parallel", "4", "--head", "diffusion", "--steps", "8", "--out", str(out), "--batch-size", "8",
                 "--lr", "3e-3", "--warmup", "2", "--ema", "0.99", "--save-every", "8", "--samples-per-class", "2",
                 "--sample-steps", "3", "--cfg", "2.5", "--no-progress"]) == 0
    return out, root / "tok", root / "data"


def test_train_writes_a_pipeline_with_the_flags(trained):
    out, _, _ = trained
    pipe = pl.BitDancePipeline.from_pretrained(out / "model")
    c = pipe.model.config
    assert (c.parallel, c.head, c.num_sampling_steps, c.cfg_scale) == (4, "diffusion", 3, 2.5)
    assert pipe.class_names == CLASSES
    assert (out / "samples.png").is_file() and (out / "losses.jsonl").is_file()


def test_sample_png_grid(trained, tmp_path, capsys):
    from PIL import Image

    out, _, _ = trained
    png = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out), "--class-label", "ring", "0", "--num-images", "3",
                 "--out", str(png), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    grid = Image.open(png)
    assert grid.height == (2 * (16 + 2) + 2) * 4  # two rows (one per label) of 16 px tiles, upscaled to 64 px


def test_sample_npz_is_reproducible_and_in_label_order(trained, tmp_path):
    out, _, _ = trained
    args = ["sample", "--model", str(out / "model"), "--num-images", "2", "--batch-size", "3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.npz")]) == 0
    images, labels = load_npz(tmp_path / "a.npz")
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8  # every class, 2 each
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert main([*args, "--out", str(tmp_path / "b.npz")]) == 0
    assert np.array_equal(load_npz(tmp_path / "b.npz")[0], images)  # same seed, same images
    assert main([*args, "--out", str(tmp_path / "c.npz"), "--seed", "1", "--steps", "2", "--cfg", "1"]) == 0
    assert not np.array_equal(load_npz(tmp_path / "c.npz")[0], images)
    # the sampler temperature: 1 is the model's default, 0 samples otherwise
    for temperature, same in (("1", True), ("0", False)):
        assert main([*args, "--out", str(tmp_path / "t.npz"), "--temperature", temperature]) == 0
        assert np.array_equal(load_npz(tmp_path / "t.npz")[0], images) == same


def test_sample_with_a_guide_model(trained, tmp_path):
    out, _, _ = trained
    args = ["sample", "--model", str(out), "--num-images", "2", "--no-progress"]
    assert main([*args, "--cfg", "1", "--out", str(tmp_path / "plain.npz")]) == 0
    # the model guiding itself (the run folder as --guide-model) is no guidance at all, end to end
    assert main([*args, "--guide-model", str(out), "--cfg", "3", "--out", str(tmp_path / "self.npz")]) == 0
    assert np.array_equal(load_npz(tmp_path / "self.npz")[0], load_npz(tmp_path / "plain.npz")[0])
    # a weaker guide (another generator of the same tokens) moves the samples; --guidance cfg ignores it
    guide = pl.BitDancePipeline.from_pretrained(out).model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.05 * torch.randn_like(p))
    guide.save_pretrained(tmp_path / "guide")
    assert main([*args, "--guide-model", str(tmp_path / "guide"), "--cfg", "3", "--out", str(tmp_path / "g.npz")]) == 0
    assert not np.array_equal(load_npz(tmp_path / "g.npz")[0], load_npz(tmp_path / "plain.npz")[0])
    assert main([*args, "--guide-model", str(tmp_path / "guide"), "--guidance", "cfg", "--cfg", "1",
                 "--out", str(tmp_path / "c.npz")]) == 0
    assert np.array_equal(load_npz(tmp_path / "c.npz")[0], load_npz(tmp_path / "plain.npz")[0])


def test_threads_flag(trained, tmp_path, capsys):
    import torch

    out, _, _ = trained
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "2", "sample", "--model", str(out), "--class-label", "0", "--num-images", "1",
                     "--no-progress", "--out", str(tmp_path / "t.png")]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert main(["--threads", "0", "sample", "--model", str(out), "--out", str(tmp_path / "u.png")]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "u.png").exists()


def test_sample_errors(trained, tmp_path, capsys, monkeypatch):
    out, _, _ = trained
    monkeypatch.setattr(pl, "builtin_path", lambda: tmp_path / "no_builtin")
    cases = [
        (["sample", "--out", str(tmp_path / "x.png")], "built-in model is not installed"),
        (["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")], "model folder not found"),
        (["sample", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")], "not a BitDance pipeline folder"),
        (["sample", "--model", str(out), "--out", str(tmp_path / "x.jpg")], "must end in .png"),
        (["sample", "--model", str(out), "--class-label", "blob", "--out", str(tmp_path / "x.png")], "unknown class"),
        (["sample", "--model", str(out), "--class-label", "7", "--out", str(tmp_path / "x.png")], "out of range"),
        (["sample", "--model", str(out), "--num-images", "0", "--out", str(tmp_path / "x.png")], "--num-images"),
        (["sample", "--model", str(out), "--cfg", "0.5", "--out", str(tmp_path / "x.png")], "cfg scale"),
        (["sample", "--model", str(out), "--temperature", "-1", "--out", str(tmp_path / "x.png")], "temperature"),
        (["sample", "--model", str(out), "--rgb", "--out", str(tmp_path / "x.png")], "--rgb has no effect"),
        (["sample", "--model", str(out), "--scale", "2", "--out", str(tmp_path / "x.npz")], "--scale has no effect"),
        (["sample", "--model", str(out), "--guidance", "guide", "--out", str(tmp_path / "x.png")], "needs a guide"),
        (["sample", "--model", str(out), "--guide-model", str(tmp_path), "--out", str(tmp_path / "x.png")],
         "no generator found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("bitdance: error:") and message in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("scale", ["0", "-2"])
def test_sample_refuses_a_scale_below_one_before_sampling(tmp_path, capsys, monkeypatch, scale):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --scale was checked")

    monkeypatch.setattr(pl.BitDancePipeline, "from_pretrained", no_loading)
    assert main(["sample", "--scale", scale, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitdance: error: --scale must be at least 1") and "\n" not in err


def test_device_and_output_errors_are_one_line(trained, tmp_path, capsys):
    """A device this machine lacks, or an output path that cannot be written: one line and exit 2, no traceback."""
    out, _, _ = trained
    (tmp_path / "file").write_text("")
    cases = [(["sample", "--model", str(out), "--device", "foo", "--out", str(tmp_path / "x.png")], "unknown device"),
             (["sample", "--model", str(out), "--num-images", "1", "--steps", "1", "--no-progress",
               "--out", str(tmp_path / "file" / "x.png")], f"cannot create the output folder {tmp_path / 'file'}")]
    if not torch.cuda.is_available():
        cases.append((["sample", "--model", str(out), "--device", "cuda", "--out", str(tmp_path / "x.png")],
                      "CUDA is not available"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("bitdance: error:") and message in err and "\n" not in err, (argv, err)


def test_help_shows_only_meaningful_defaults(capsys):
    """'(default: True)' on --no-progress reads as the opposite of what it does; None defaults say nothing."""
    for argv in (["train", "--help"], ["tokenizer", "train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
        assert "(default: 0.001)" in text or "(default: 0.002)" in text  # real defaults still shown


def test_train_errors(trained, tmp_path, capsys):
    _, tok, data = trained
    base = ["train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), "--no-progress"]
    for argv, message in [
        ([*base, "--tokenizer", str(tmp_path / "nope"), "--data", str(data)], "tokenizer folder not found"),
        ([*base, "--tokenizer", str(tok), "--data", str(tmp_path / "nope")], "data path not found"),
        ([*base, "--tokenizer", str(data), "--data", str(data)], "holds no saved tokenizer"),
        ([*base, "--tokenizer", str(tok), "--data", str(data), "--cfg", "0.5"], "cfg_scale must be finite and >= 1"),
        ([*base, "--tokenizer", str(tok), "--data", str(data), "--sample-steps", "0"], "num_sampling_steps must be"),
        ([*base, "--tokenizer", str(tok), "--data", str(data), "--model-arg", "dimm=8"], "dimm"),
        ([*base, "--tokenizer", str(tok), "--data", str(data), "--dtype", "float16"], "needs loss scaling"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r" / "tokens.safetensors").exists(), argv  # refused before encoding the data
    assert not (tmp_path / "r" / "model").exists()
    with pytest.raises(SystemExit) as e:  # argparse: an unknown head
        main([*base, "--tokenizer", str(tok), "--data", str(data), "--head", "mlp"])
    assert e.value.code == 2


@pytest.mark.parametrize("command", ["train", "tokenizer train"])
def test_training_flags_all_reach_the_config(command):
    """Every flag of both training commands lands in a config field (a mistyped dest would be dropped silently),
    and the shared optimiser flags read the same in both, under either EMA spelling."""
    from dataclasses import fields

    from bitdance.cli import build_parser
    from bitdance.commands.options import config_from_args
    from bitdance.train import TrainConfig
    from bitdance.train_tokenizer import TokenizerTrainConfig

    argv = command.split() + ["--data", "d", "--out", "o"] + (["--tokenizer", "t"] if command == "train" else [])
    config_cls = TrainConfig if command == "train" else TokenizerTrainConfig
    for ema_flag in ("--ema", "--ema-decay"):
        args = build_parser().parse_args(argv + [ema_flag, "0.95", "--steps", "7", "--lr", "2e-4", "--seed", "3",
                                                 "--no-ema-export", "--resume", "r", "--no-progress"])
        parser_only = {"threads", "command", "tokenizer_command", "func"}
        assert set(vars(args)) - parser_only <= {f.name for f in fields(config_cls)}
        cfg = config_from_args(config_cls, args)
        assert (cfg.ema_decay, cfg.steps, cfg.lr, cfg.seed, cfg.export_ema, cfg.resume, cfg.progress) == (
            0.95, 7, 2e-4, 3, False, "r", False)


def test_model_arg_values_are_read_as_json(capsys):
    from bitdance.cli import build_parser

    args = build_parser().parse_args(["train", "--tokenizer", "t", "--data", "d", "--out", "o", "--model-arg",
                                      "dim=384", "--model-arg", "P_std=0.5", "--model-arg", "cfg_schedule=constant"])
    assert args.model_args == [("dim", 384), ("P_std", 0.5), ("cfg_schedule", "constant")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--tokenizer", "t", "--data", "d", "--out", "o", "--model-arg", "dim"])
    assert "FIELD=VALUE" in capsys.readouterr().err
