import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance.data import (
    FASHION_MNIST_CLASSES,
    InfiniteBatches,
    SyntheticImages,
    encode_dataset,
    eval_indices,
    load_dataset,
    load_image,
    load_image_array,
    read_idx,
)
from bitdance.utils import UserError


def _png(path, value, size=(20, 24), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _write_idx(path, arr: np.ndarray):
    magic = 0x800 | arr.ndim | (0x08 << 8)  # 0x0803 / 0x0801: uint8 data
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}i", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_class_folders_give_sorted_labels(tmp_path):
    for name, v in (("zebra", (250, 0, 0)), ("apple", (0, 250, 0)), ("mango", (0, 0, 250))):
        for i in range(2):
            _png(tmp_path / name / f"{i}.png", v)
    ds = load_dataset(tmp_path, resolution=16)
    assert ds.class_names == ["apple", "mango", "zebra"]
    assert ds.channels == 3 and len(ds) == 6
    img, label = ds[5]
    assert img.shape == (3, 16, 16) and label == 2
    assert img[0].mean() > 0.9 and img[1].mean() < -0.9  # zebra is red: (250 / 127.5 - 1) ~ 0.96
    images, labels = ds.get_batch([0, 2, 4])
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 2]


def test_flat_folder_is_unlabelled_and_grey_is_detected(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", 30 * i, size=(40, 64), mode="L")
    ds = load_dataset(tmp_path, resolution=32)
    assert ds.class_names is None and ds.channels == 1
    img, label = ds[2]
    assert label == -1 and img.shape == (1, 32, 32)
    assert torch.allclose(img, torch.full_like(img, 60 / 127.5 - 1), atol=1e-6)
    rgb = load_dataset(tmp_path, resolution=32, channels=3)
    assert rgb[0][0].shape == (3, 32, 32)


def test_corrupt_file_is_reported_by_name_and_skipped(tmp_path, caplog):
    for i in range(3):
        _png(tmp_path / "cats" / f"{i}.png", (10, 20, 30))
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = tmp_path / "cats" / "0.png"
    (tmp_path / "cats" / "truncated.png").write_bytes(good.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="bitdance.data"):
        ds = load_dataset(tmp_path, resolution=8)
    assert len(ds) == 3 and ds.skipped == 2
    assert "broken.png" in caplog.text and "truncated.png" in caplog.text
    assert "skipped 2" in caplog.text


def test_file_failing_late_is_replaced_not_fatal(tmp_path, caplog):
    for i in range(3):
        _png(tmp_path / f"{i}.png", 100)
    ds = load_dataset(tmp_path, resolution=8)
    (tmp_path / "1.png").write_bytes(b"gone bad after indexing")
    with caplog.at_level(logging.WARNING, logger="bitdance.data"):
        images, _ = ds.get_batch([0, 1, 2])
    assert images.shape == (3, 3, 8, 8) and ds.skipped == 1 and "1.png" in caplog.text


def test_missing_and_empty_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_dataset(tmp_path / "empty", 32)
    with pytest.raises(UserError, match="image not found"):
        load_image(tmp_path / "x.png", 32, 3)


def test_idx_parsing_and_28_to_32_padding(tmp_path):
    tmp_path = tmp_path / "Fashion-MNIST"  # recognisably Fashion-MNIST: its class names
    tmp_path.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(1, 256, size=(5, 28, 28))  # no zero pixels inside: padding must be exactly 0
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", train[:2])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 2]))
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (5, 28, 28)

    ds = load_dataset(tmp_path, resolution=32)
    assert len(ds) == 5 and ds.class_names == list(FASHION_MNIST_CLASSES) and ds.channels == 1
    assert ds.labels.tolist() == [3, 1, 4, 1, 5]
    u8 = ds.images[0, 0]  # (32, 32)
    assert torch.equal(u8[2:30, 2:30], torch.from_numpy(train[0].astype(np.uint8)))  # not resampled
    assert u8[:2].eq(0).all() and u8[30:].eq(0).all() and u8[:, :2].eq(0).all() and u8[:, 30:].eq(0).all()
    img, label = ds[0]
    assert label == 3 and img[0, 0, 0] == -1.0

    test = load_dataset(tmp_path, resolution=32, channels=3, split="test")
    assert len(test) == 2 and test.labels.tolist() == [9, 2] and test[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match="split"):
        load_dataset(tmp_path, resolution=32, split="validation")

    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x99" + b"\x00" * 8))
    with pytest.raises(UserError, match="not an IDX"):
        load_dataset(tmp_path, resolution=32, split="test")


def test_resize_shorter_side_and_centre_crop(tmp_path):
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, 12:68] = 255  # white centre, black left/right margins that the crop must remove
    Image.fromarray(img).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 20, 3)  # 40x80 -> 20x40 -> crop the centre 20x20
    assert x.shape == (3, 20, 20) and x.min() > 0.95


def test_synthetic_is_seeded_and_batches_resume(tmp_path):
    a, b = SyntheticImages(12, 16, 3, num_classes=4, seed=1), SyntheticImages(12, 16, 3, num_classes=4, seed=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, SyntheticImages(12, 16, 3, 4, seed=2).images)
    assert a.labels.tolist()[:5] == [0, 1, 2, 3, 0] and a.class_names == ["circle", "square", "diamond", "ring"]

    full = InfiniteBatches(a, 4, seed=3)
    seq = [next(full)[0] for _ in range(7)]  # images (4, c, H, W); crosses epochs (3 batches per epoch)
    resumed = InfiniteBatches(a, 4, seed=3, start_step=4)
    assert all(torch.equal(next(resumed)[0], x) for x in seq[4:])
    # one epoch visits every image once: match each image to its index (the shapes are seeded, all distinct)
    every = a.get_batch(range(len(a)))[0]  # (12, c, H, W)
    seen = [j for x in torch.cat(seq[:3]) for j in range(len(a)) if torch.equal(every[j], x)]
    assert sorted(seen) == list(range(len(a)))
    r0, r1 = InfiniteBatches(a, 3, rank=0, world_size=2, seed=3), InfiniteBatches(a, 3, rank=1, world_size=2, seed=3)
    (i0, _), (i1, _) = next(r0), next(r1)
    assert not any(torch.equal(i0[j], i1[j]) for j in range(3))  # ranks see different images
    assert eval_indices(100, 5).tolist() == [0, 25, 50, 74, 99]


class _SignTokenizer(torch.nn.Module):
    """Stand-in tokenizer: 2x2 average pooling, 4 'bits' from the sign of channel-shifted means."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor([0.0, 0.2, -0.2, 0.5]))
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        m = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)  # (b, 1, h, w)
        z = m + self.offset.view(1, 4, 1, 1)  # (b, 4, h, w)
        return torch.where(z > 0, 1.0, -1.0)


def test_encode_dataset_caches_by_fingerprint(tmp_path):
    ds = SyntheticImages(10, 16, 3, num_classes=2, seed=0)
    tok = _SignTokenizer()
    codes, labels = encode_dataset(tok, ds, batch_size=4, device="cpu", cache_path=tmp_path / "c.safetensors",
                                   progress=False)
    assert codes.dtype == torch.int8 and codes.shape == (10, 4, 4, 4) and set(codes.unique().tolist()) <= {-1, 1}
    assert torch.equal(labels, ds.labels) and tok.calls == 3
    again, _ = encode_dataset(tok, ds, 4, "cpu", tmp_path / "c.safetensors", progress=False)
    assert tok.calls == 3 and torch.equal(again, codes)  # served from the cache
    with torch.no_grad():
        tok.offset[0] = 5.0  # another tokenizer: the cache must be rebuilt
    fresh, _ = encode_dataset(tok, ds, 4, "cpu", tmp_path / "c.safetensors", progress=False)
    assert tok.calls == 6 and (fresh[:, 0] == 1).all()
    other = SyntheticImages(10, 16, 3, num_classes=2, seed=1)  # other images, same tokenizer: rebuilt too
    encode_dataset(tok, other, 4, "cpu", tmp_path / "c.safetensors", progress=False)
    assert tok.calls == 9


def test_folder_fingerprint_ignores_how_the_path_is_written(tmp_path, monkeypatch):
    for name in ("a", "b"):
        _png(tmp_path / "data" / name / "0.png", (10, 20, 30))
    monkeypatch.chdir(tmp_path)
    relative, absolute = load_dataset("data", 8), load_dataset(tmp_path / "data", 8)
    assert str(relative.files[0]) != str(absolute.files[0])
    key = relative.fingerprint()
    assert absolute.fingerprint() == key
    assert load_dataset("data", 16).fingerprint() != key  # another resolution
    _png(tmp_path / "data" / "b" / "0.png", (10, 20, 30), size=(30, 30))  # a file rewritten in place
    assert load_dataset("data", 8).fingerprint() != key


def test_split_folders_and_empty_classes_keep_labels_aligned(tmp_path):
    """train/ alone is a split, not a class called "train"; an empty class folder keeps its label, so a class
    has the same id in every split."""
    for name in ("a", "b", "c"):
        _png(tmp_path / "train" / name / "0.png", (10, 10, 10))
    (tmp_path / "test" / "b").mkdir(parents=True)  # a class with no test images
    for name in ("a", "c"):
        _png(tmp_path / "test" / name / "0.png", (10, 10, 10))
    train, test = load_dataset(tmp_path, 16), load_dataset(tmp_path, 16, split="test")
    assert train.class_names == test.class_names == ["a", "b", "c"]
    assert train.get_batch(range(3))[1].tolist() == [0, 1, 2] and test.get_batch(range(2))[1].tolist() == [0, 2]
    (tmp_path / "test" / "b").rmdir()  # no folder at all: train/ still fixes the ids
    test = load_dataset(tmp_path, 16, split="test")
    assert test.class_names == ["a", "b", "c"] and test.get_batch(range(2))[1].tolist() == [0, 2]
    _png(tmp_path / "test" / "d" / "0.png", (10, 10, 10))  # a class train/ lacks
    with pytest.raises(UserError, match="class folder.* d .*not in the train split"):
        load_dataset(tmp_path, 16, split="test")
    only_train = tmp_path / "only_train"
    for name in ("a", "b"):
        _png(only_train / "train" / name / "0.png", (10, 10, 10))
    assert load_dataset(only_train, 16).class_names == ["a", "b"]
    with pytest.raises(UserError, match="no 'test' split"):
        load_dataset(only_train, 16, split="test")


def test_broken_idx_files_are_user_errors(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 6))  # header cut after 1.5 of 3 dims
    with pytest.raises(UserError, match="cut short"):
        read_idx(path)
    _write_idx(path, np.zeros((0, 28, 28)))
    with pytest.raises(UserError, match="no images"):
        read_idx(path)
    raw = bytearray(gzip.compress(bytes(range(256)) * 64))
    raw[20:40] = bytes(b ^ 0xFF for b in raw[20:40])  # flip bytes inside the deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="cannot read IDX file .*train-images-idx3-ubyte.gz"):
        read_idx(path)


def test_idx_class_names_follow_the_folder_name(tmp_path):
    # this test's name must not contain "fashion": tmp_path (the parent of "mnist") is named after it
    for folder, labels in (("mnist", [3, 1, 9]), ("FashionMNIST/raw", [3, 1, 9]), ("emnist", [0, 11, 2])):
        (tmp_path / folder).mkdir(parents=True)
        _write_idx(tmp_path / folder / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
        _write_idx(tmp_path / folder / "train-labels-idx1-ubyte.gz", np.array(labels))
    mnist = load_dataset(tmp_path / "mnist", 32)
    assert mnist.class_names == [str(i) for i in range(10)] and mnist.num_classes == 10
    assert load_dataset(tmp_path / "FashionMNIST" / "raw", 32).class_names == list(FASHION_MNIST_CLASSES)
    assert load_dataset(tmp_path / "emnist", 32).num_classes == 12  # labels.max() + 1, never 0


def test_16_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = load_image_array(tmp_path / "deep.png", 32, 1)[0]  # (H, W) uint8
    np.testing.assert_allclose(grey.astype(float), ramp / 257.0, atol=0.51)  # full range, not 99% white
    rgb = load_image_array(tmp_path / "deep.png", 32, 3)
    assert rgb.shape == (3, 32, 32) and (rgb == grey[None]).all()
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(UserError, match="float.tiff.*mode F"):
        load_image_array(tmp_path / "float.tiff", 32, 1)


def test_float_images_are_skipped_when_indexing(tmp_path, caplog):
    """Mode F passes `verify()` but never decodes: it is refused up front, and it does not count as grey."""
    _png(tmp_path / "a.png", (10, 20, 30))
    Image.fromarray(np.zeros((8, 8), dtype=np.float32)).save(tmp_path / "float.tiff")
    with caplog.at_level(logging.WARNING, logger="bitdance.data"):
        ds = load_dataset(tmp_path, resolution=8)
    assert len(ds) == 1 and ds.skipped == 1 and ds.channels == 3
    assert "float.tiff" in caplog.text and "mode F" in caplog.text
    (tmp_path / "a.png").unlink()
    _png(tmp_path / "b.png", 50, mode="L")
    assert load_dataset(tmp_path, resolution=8).channels == 1
