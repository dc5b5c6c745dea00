import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from bitdance.cli import main
from bitdance.data import SyntheticImages
from bitdance.utils import to_uint8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 synthetic 16x16 images in 3 class folders, plus one corrupt file."""
    root = tmp_path_factory.mktemp("cli_data")
    ds = SyntheticImages(12, 16, 3, num_classes=3, seed=1)
    arr = to_uint8(ds.get_batch(range(12))[0]).numpy()
    for i in range(12):
        d = root / ds.class_names[int(ds.labels[i])]
        d.mkdir(exist_ok=True)
        Image.fromarray(arr[i]).save(d / f"img{i}.png")
    (root / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    rc = main(["tokenizer", "train", "--data", str(folder), "--preset", "tiny", "--steps", "4", "--batch-size", "4",
               "--out", str(out), "--log-every", "2", "--eval-images", "4", "--no-progress"])
    assert rc == 0
    return out


def _error_line(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitdance: error: "), err
    return err[0]


def test_train_reports_the_corrupt_file_and_exports(trained, capsys):
    log = (trained / "log.txt").read_text()
    assert "corrupt.png" in log and "skipped 1" in log
    assert json.loads((trained / "config.json").read_text())["data"]["skipped"] == 1
    assert (trained / "model" / "model.safetensors").is_file()


def test_eval_json_and_reconstruct(trained, folder, tmp_path, capsys):
    capsys.readouterr()
    assert main(["tokenizer", "eval", "--model", str(trained / "model"), "--data", str(folder), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["num_images"] == 12 and res["skipped_images"] == 1 and res["quantizer"] == "binary"
    assert 0 < res["psnr"] < 100 and -1 <= res["ssim"] <= 1 and 0 < res["bit_usage"] < 1
    assert len(res["perplexity_per_group"]) == 2 and all(1 <= p <= 256 for p in res["perplexity_per_group"])

    assert main(["tokenizer", "eval", "--model", str(trained), "--data", str(folder), "--num-images", "3"]) == 0
    assert "PSNR" in capsys.readouterr().out  # a run folder works as --model, human-readable table
    # without --model: the built-in tokenizer (1 channel, 32x32; the RGB 16x16 images are converted)
    assert main(["tokenizer", "eval", "--data", str(folder), "--num-images", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"].endswith("builtin/tokenizer") and res["num_images"] == 3 and res["bits_per_token"] == 32

    imgs = [str(folder / "circle" / "img0.png"), str(folder / "diamond" / "img2.png")]
    assert main(["tokenizer", "reconstruct", "--model", str(trained / "model"), *imgs, "--out", str(tmp_path)]) == 0
    out = Image.open(tmp_path / "img0_recon.png")
    assert out.size[0] > 2 * out.size[1] * 0.9  # original and reconstruction side by side
    assert (tmp_path / "img2_recon.png").is_file()


def test_error_paths_give_one_line(trained, folder, tmp_path, capsys):
    line = _error_line(capsys, ["tokenizer", "eval", "--model", str(tmp_path / "nope"), "--data", str(folder)])
    assert "nope" in line
    line = _error_line(capsys, ["tokenizer", "eval", "--model", str(trained / "model"), "--data",
                                str(tmp_path / "missing")])
    assert "missing" in line
    line = _error_line(capsys, ["tokenizer", "reconstruct", "--model", str(trained / "model"),
                                str(folder / "square" / "corrupt.png"), "--out", str(tmp_path)])
    assert "corrupt.png" in line
    (tmp_path / "no_tokenizer").mkdir()
    line = _error_line(capsys, ["tokenizer", "eval", "--model", str(tmp_path / "no_tokenizer"), "--data", str(folder)])
    assert "no tokenizer found" in line

    # a checkpoint whose weights do not match its config
    bad = tmp_path / "bad_model"
    shutil.copytree(trained / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["ch"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    line = _error_line(capsys, ["tokenizer", "eval", "--model", str(bad), "--data", str(folder)])
    assert "do not match" in line

    (tmp_path / "empty").mkdir()
    line = _error_line(capsys, ["tokenizer", "train", "--data", str(tmp_path / "empty"), "--preset", "tiny",
                                "--steps", "1", "--out", str(tmp_path / "r")])
    assert "no images" in line
    line = _error_line(capsys, ["tokenizer", "train", "--data", str(folder), "--preset", "tiny", "--steps", "1",
                                "--disc-weight", "0.1", "--disc-lr", "0", "--out", str(tmp_path / "r")])
    assert "--disc-lr must be > 0" in line  # 0 used to fall back to --lr without a word
    line = _error_line(capsys, ["tokenizer", "train", "--data", str(folder), "--preset", "tiny", "--steps", "1",
                                "--disc-warmup", "10", "--out", str(tmp_path / "r")])
    assert "--disc-warmup has no effect with --disc-weight 0" in line
    for scale in ("0", "-1"):  # 0 quietly meant the default, -1 was a PIL traceback
        line = _error_line(capsys, ["tokenizer", "reconstruct", "--model", str(trained / "model"), "--scale", scale,
                                    str(folder / "circle" / "img0.png"), "--out", str(tmp_path)])
        assert "--scale must be at least 1" in line


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--preset", "--quantizer", "--batch-size", "--lr", "--dtype", "--device", "--resume",
                 "--disc-weight", "--disc-start", "--lpips-weights", "--eval-every"):
        assert flag in out
    assert "(default:" in out


@pytest.mark.slow
def test_torchrun_two_ranks(folder, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside the interpreter")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "bitdance.cli", "tokenizer",
                           "train", "--data", str(folder), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                           "--out", str(out), "--eval-images", "0", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(out / "model")]  # rank 0 prints, once
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert "2 per rank x 2" in (out / "log.txt").read_text()


def test_eval_saves_reconstructions_for_rfid(trained, folder, tmp_path, capsys):
    import numpy as np

    from bitdance.data import load_dataset
    from bitdance.evaluation.npz import load_npz

    npz = tmp_path / "recon.npz"
    assert main(["tokenizer", "eval", "--model", str(trained / "model"), "--data", str(folder), "--json",
                 "--save-reconstructions", str(npz)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    images, labels = load_npz(npz)
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    real_images, real_labels = load_dataset(folder, 16, 3).get_batch(range(12))
    assert labels.tolist() == real_labels.tolist()  # same order as the data set
    real = to_uint8(real_images).numpy().astype(np.float64)
    mse = ((images.astype(np.float64) - real) ** 2).mean(axis=(1, 2, 3))
    psnr = (10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))).mean()
    assert abs(psnr - res["psnr"]) < 0.5  # the saved images are the reconstructions that were scored
    _error_line(capsys, ["tokenizer", "eval", "--model", str(trained / "model"), "--data", str(folder),
                         "--save-reconstructions", str(tmp_path / "recon.png")])


def test_reconstructions_of_an_unlabelled_folder_carry_no_labels(trained, folder, tmp_path, capsys):
    """A flat folder has no classes: the .npz must not carry its -1 placeholders as class ids."""
    from bitdance.evaluation.npz import load_npz

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(folder.glob("*/img*.png"))[:5]:
        shutil.copy(f, flat / f.name)
    npz = tmp_path / "recon.npz"
    assert main(["tokenizer", "eval", "--model", str(trained / "model"), "--data", str(flat), "--json",
                 "--save-reconstructions", str(npz)]) == 0
    images, labels = load_npz(npz)
    assert images.shape[0] == 5 and labels is None
