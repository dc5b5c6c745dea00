"""Image data: class folders, flat folders, Fashion-MNIST IDX files, synthetic shapes; token caches.

Every dataset yields `(image, label)` with `image` a float tensor (c, H, W) in [-1, 1] (the official mapping
x / 127.5 - 1) and `label` an int (-1 when unlabelled). `get_batch(indices)` returns a whole batch at once;
in-memory datasets (Fashion-MNIST, synthetic) keep a uint8 tensor and convert per batch, which is what makes
CPU training on them cheap.

Geometry: images are resized so that the shorter side equals the resolution (bicubic, antialiased), then
centre-cropped. An image that is already slightly smaller than the target (at least 3/4 of it on both sides,
e.g. Fashion-MNIST 28x28 -> 32x32) is padded with its background value instead of being resized, so no
pixel gets resampled.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bitdance.utils import UserError, atomic_path, files_fingerprint, first_line

log = logging.getLogger("bitdance.data")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PAD_MIN_FRACTION = 0.75  # pad (never resample) images at least this fraction of the target size
FLOAT_MODE_ERROR = "floating-point pixels (mode F) have no agreed range; save the image as 8 or 16 bits"


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Base class: images at a fixed resolution and channel count, integer labels, optional class names."""

    resolution: int
    channels: int
    class_names: list[str] | None = None
    skipped: int = 0
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i)] for i in indices]
        images = torch.stack([x for x, _ in items])  # (b, c, H, W)
        labels = torch.tensor([y for _, y in items], dtype=torch.long)  # (b,)
        return images, labels

    def fingerprint(self) -> str:
        raise NotImplementedError


class TensorImages(ImageDataset):
    """Images held in memory as one uint8 tensor (N, c, H, W), already at the target resolution."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names=None, source: str = ""):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("TensorImages wants a uint8 tensor (N, c, H, W)")
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be square, got {tuple(images.shape[2:])}")
        self.images = images.contiguous()
        self.labels = labels.long()
        self.resolution = images.shape[-1]
        self.channels = images.shape[1]
        self.class_names = list(class_names) if class_names else None
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return to_float(self.images[i]), int(self.labels[i])

    def get_batch(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return to_float(self.images[idx]), self.labels[idx]  # (b, c, H, W), (b,)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{tuple(self.images.shape)}".encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]


class FolderImages(ImageDataset):
    """Image files decoded lazily. Files are checked at index time (PIL header + `verify()`); a file that still
    fails to decode later is logged by name and replaced by the next good one, so a run never stops on it."""

    def __init__(self, files: list[Path], labels: list[int], resolution: int, channels: int,
                 class_names=None, skipped: int = 0, source: str = "", root: str | os.PathLike | None = None):
        self.files = files
        self.root = Path(source if root is None else root)  # files are keyed relative to it
        self.labels = labels
        self.resolution = resolution
        self.channels = channels
        self.class_names = class_names
        self.skipped = skipped
        self.source = source
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                arr = load_image_array(self.files[j], self.resolution, self.channels)  # (c, H, W) uint8
            except UserError as e:
                self._bad.add(j)
                self.skipped += 1
                # rank_local: only the rank that decoded this file knows of it, so every rank reports it
                log.warning("skipping %s (%d skipped so far)", e, self.skipped, extra={"rank_local": True})
                continue
            return to_float(torch.from_numpy(arr)), self.labels[j]
        raise UserError(f"no readable image left in {self.source}")

    def fingerprint(self) -> str:
        # relative names: the same folder reached by another path (relative, absolute, a mount) keeps its key
        files = files_fingerprint(self.files, self.root)
        h = hashlib.sha256(f"{self.resolution}/{self.channels}/{files}".encode())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


class SyntheticImages(TensorImages):
    """Procedural shapes, one shape per class, with random position, size and colours (seeded).

    Classes: circle, square, diamond, ring, cross, triangle, horizontal stripes, vertical stripes,
    checkerboard, diagonal gradient (up to 10).
    """

    SHAPES = ("circle", "square", "diamond", "ring", "cross", "triangle", "hstripes", "vstripes", "checker",
              "gradient")

    def __init__(self, num_images: int = 64, resolution: int = 32, channels: int = 3, num_classes: int = 4,
                 seed: int = 0):
        if not 1 <= num_classes <= len(self.SHAPES):
            raise UserError(f"SyntheticImages supports 1..{len(self.SHAPES)} classes, got {num_classes}")
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(num_images) % num_classes
        coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) each, in (0, 1)
        images = torch.empty(num_images, channels, resolution, resolution, dtype=torch.uint8)
        for i in range(num_images):
            cx, cy = (0.3 + 0.4 * torch.rand(2, generator=g)).tolist()
            r = 0.15 + 0.15 * torch.rand(1, generator=g).item()
            fg = torch.rand(channels, generator=g) * 0.6 + 0.4  # bright shape on a dark background
            bg = torch.rand(channels, generator=g) * 0.3
            mask = self._mask(self.SHAPES[int(labels[i])], xx - cx, yy - cy, r, xx, yy)  # (H, W) in [0, 1]
            img = bg[:, None, None] + (fg - bg)[:, None, None] * mask  # (c, H, W)
            images[i] = (img * 255).round().clamp(0, 255).to(torch.uint8)
        super().__init__(images, labels, [self.SHAPES[k] for k in range(num_classes)], source="synthetic")

    @staticmethod
    def _mask(shape, dx, dy, r, xx, yy):
        if shape == "circle":
            m = dx**2 + dy**2 < r**2
        elif shape == "square":
            m = torch.maximum(dx.abs(), dy.abs()) < r
        elif shape == "diamond":
            m = dx.abs() + dy.abs() < r
        elif shape == "ring":
            d = (dx**2 + dy**2).sqrt()
            m = (d < r) & (d > 0.55 * r)
        elif shape == "cross":
            m = ((dx.abs() < r / 3) & (dy.abs() < r)) | ((dy.abs() < r / 3) & (dx.abs() < r))
        elif shape == "triangle":
            m = (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2)
        elif shape == "hstripes":
            m = torch.sin(yy * 40 * r) > 0
        elif shape == "vstripes":
            m = torch.sin(xx * 40 * r) > 0
        elif shape == "checker":
            m = (torch.sin(xx * 40 * r) > 0) ^ (torch.sin(yy * 40 * r) > 0)
        else:  # gradient: a soft ramp along a random-ish diagonal
            return ((dx + dy) / (4 * r) + 0.5).clamp(0, 1)
        return m.float()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_dataset(path: str | os.PathLike, resolution: int, channels: int | None = None,
                 split: str = "train") -> ImageDataset:
    """Open `path`: a folder of Fashion-MNIST IDX files, a folder of class subfolders, or a flat image folder.

    A folder with a `train/` subfolder is split on disk: `split` picks `train/`, or `test/` (`val/` if there
    is no `test/`); asking for a split it lacks is an error. Any other folder is used whole for every split.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path not found: {path}")
    if not path.is_dir():
        raise UserError(f"data path must be a folder of images or of Fashion-MNIST IDX files: {path}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    root, folder = _split_source(path, split)
    if folder is None:
        return load_idx(root, resolution, channels, split)
    # split on disk: train/ fixes the classes and their ids for every split
    class_names = _class_names(root / "train") if folder not in (root, root / "train") else None
    return load_folder(folder, resolution, channels, class_names)


def data_fingerprint(path: str | os.PathLike, split: str = "test") -> str:
    """A cheap content key for the files `load_dataset(path, split=split)` reads (stat only, nothing decoded):
    the split's IDX pair, or the image files of the split's folder."""
    root, split_dir = _split_source(Path(path), split)
    files = _find_idx(root, split) if split_dir is None else _image_files(split_dir, recursive=True)
    return files_fingerprint(files or [], root)


def _split_source(path: Path, split: str) -> tuple[Path, Path | None]:
    """(path, None) for IDX data; else (path, the folder holding the split's images)."""
    if _find_idx(path, "train") or _find_idx(path, "test"):
        return path, None
    if (path / "train").is_dir():
        sub = path / split
        if split == "test" and not sub.is_dir():
            sub = path / "val"
        if not sub.is_dir():
            raise UserError(f"{path} has no {split!r} split folder")
        return path, sub
    return path, path


def _find_idx(folder: Path, split: str) -> tuple[Path, Path] | None:
    if split not in IDX_FILES:
        return None
    found = []
    for stem in IDX_FILES[split]:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                found.append(folder / name)
                break
    return (found[0], found[1]) if len(found) == 2 else None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x00000803 (images) or 0x00000801 (labels)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt deflate stream inside the gzip
        raise UserError(f"cannot read IDX file {path}: {e}")
    if len(raw) < 8:
        raise UserError(f"{path} is too short to be an IDX file")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic not in (0x801, 0x803):
        raise UserError(f"{path} is not an IDX uint8 file (magic {magic:#010x})")
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path} is cut short inside its IDX header")
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    count = int(np.prod(dims))
    if count == 0:
        raise UserError(f"{path} holds no images ({dims})")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != count:
        raise UserError(f"{path} holds {data.size} values, its header says {count} ({dims})")
    return data.reshape(dims)


def load_idx(folder: Path, resolution: int, channels: int | None = None, split: str = "train") -> TensorImages:
    """Fashion-MNIST (or MNIST) IDX files -> an in-memory dataset. Class names: the 10 Fashion-MNIST ones when
    the folder is recognisably Fashion-MNIST (its name or its parent's contains "fashion"), else "0", "1", ..."""
    if split not in IDX_FILES:
        raise UserError(f"split must be one of {', '.join(IDX_FILES)} for IDX data, got {split!r}")
    files = _find_idx(folder, split)
    if files is None:
        raise UserError(f"{folder} has no {split} IDX files ({' and '.join(n + '.gz' for n in IDX_FILES[split])})")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(f"IDX shapes do not match in {folder}: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.copy())[:, None]  # (N, 1, h, w)
    x = fit_uint8(x, resolution, background=0)  # Fashion-MNIST backgrounds are black
    x = convert_channels(x, channels or 1)
    num_classes = int(labels.max()) + 1
    here = folder.resolve()
    # the parent too: torchvision keeps the files in FashionMNIST/raw/
    fashion = any("fashion" in p.name.lower() for p in (here, here.parent))
    names = FASHION_MNIST_CLASSES if fashion and num_classes <= 10 else [str(i) for i in range(num_classes)]
    if not fashion:  # the names are saved with a trained model: say where they came from
        log.info("%s: class names 0..%d (the folder's name does not say Fashion-MNIST)", folder, num_classes - 1)
    return TensorImages(x, torch.from_numpy(labels.astype(np.int64)), names, source=f"{folder}:{split}")


def load_folder(folder: Path, resolution: int, channels: int | None = None,
                class_names: list[str] | None = None) -> FolderImages:
    """Class subfolders (sorted names -> labels 0..C-1) or a flat folder (labels -1). Bad files are skipped.

    `class_names` (the train split's, for another split) fixes the classes and their ids: a class folder
    missing here keeps the ids of the others, and one not in the list is an error."""
    class_files = {d.name: _image_files(d, recursive=True) for d in _subfolders(folder)}
    if class_names is not None:
        unknown = sorted(set(class_files) - set(class_names))
        if unknown:
            raise UserError(f"{folder}: class folder(s) {', '.join(unknown)} are not in the train split")
    elif any(class_files.values()):
        # every subfolder is a class, empty or not, so a class keeps its label in every split of a data set
        class_names = sorted(class_files)
    if class_names is not None:
        empty = [name for name in class_names if not class_files.get(name)]
        if empty:
            log.warning("%s: no images in class folder(s) %s", folder, ", ".join(empty))
        loose = _image_files(folder, recursive=False)
        if loose:
            log.warning("%s: ignoring %d images outside the class subfolders", folder, len(loose))
        entries = [(f, y) for y, name in enumerate(class_names) for f in class_files.get(name, [])]
    else:
        entries = [(f, -1) for f in _image_files(folder, recursive=False)]
    if not entries:
        raise UserError(f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")

    from tqdm import tqdm

    good, grey, skipped = [], True, 0
    # a large folder takes a while (about 70 us per file here): show it, on one rank of a torchrun job; small
    # folders stay quiet
    quiet = len(entries) < 20000 or int(os.environ.get("RANK", "0")) != 0
    for f, y in tqdm(entries, desc=f"checking {folder.name}", unit="img", disable=quiet):
        mode, error = _check_image(f)
        if error is not None:
            skipped += 1
            log.warning("skipping unreadable image %s: %s", f, error)
            continue
        grey = grey and mode in ("1", "L", "LA", "I", "I;16")
        good.append((f, y))
    if skipped:
        log.warning("%s: skipped %d unreadable image(s), using %d", folder, skipped, len(good))
    if not good:
        raise UserError(f"no readable images in {folder} ({skipped} unreadable)")
    ds = FolderImages([f for f, _ in good], [y for _, y in good], resolution, channels or (1 if grey else 3),
                      class_names, skipped, source=str(folder), root=folder)
    return ds


def _check_image(path: Path) -> tuple[str | None, str | None]:
    """(PIL mode, None) for an image that opens and verifies, (None, reason) for one to skip."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode == "F":  # load_image_array refuses it: skip it now, not on every epoch
                raise ValueError(FLOAT_MODE_ERROR)
            im.verify()  # cheap integrity check (chunk CRCs, headers) without decoding pixels
        return mode, None
    except Exception as e:
        return None, _short(e)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_names(folder: Path) -> list[str] | None:
    """The class names `load_folder(folder)` gives: its subfolders if any holds an image, else None (flat).
    Stops at the first image found: another split needs only the names, not a listing of this one."""
    subdirs = _subfolders(folder)
    return [d.name for d in subdirs] if any(next(_iter_images(d, True), None) for d in subdirs) else None


def _iter_images(folder: Path, recursive: bool):
    it = folder.rglob("*") if recursive else folder.iterdir()
    return (p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    return sorted(_iter_images(folder, recursive))


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e, 160)}"


def load_image_array(path: str | os.PathLike, resolution: int, channels: int) -> np.ndarray:
    """Decode one image file -> uint8 (c, H, W) at the resolution. Raises UserError naming the file."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode == "F":
                raise ValueError(FLOAT_MODE_ERROR)
            if im.mode.startswith("I"):  # 16-bit greyscale: convert("L") would clip at 255, not rescale
                deep = np.asarray(im, dtype=np.float64)
                # "I;16*" is 16-bit by definition; a 32-bit "I" image may hold 8-bit values (some writers do that)
                scale = 257.0 if im.mode != "I" or deep.max() > 255 else 1.0
                im = Image.fromarray((deep / scale).round().clip(0, 255).astype(np.uint8))
            im = im.convert("L" if channels == 1 else "RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path}: {_short(e)}")
    arr = np.asarray(im)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (c, h, w)
    h, w = arr.shape[1:]
    if _should_pad(h, w, resolution):
        return fit_uint8(torch.from_numpy(arr.copy())[None], resolution)[0].numpy()
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.BICUBIC)  # PIL antialiases when shrinking
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im)
    return np.array(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1), copy=True)  # writable, contiguous


def _should_pad(h: int, w: int, resolution: int) -> bool:
    return h <= resolution and w <= resolution and min(h, w) >= PAD_MIN_FRACTION * resolution


def fit_uint8(x: torch.Tensor, resolution: int, background: int | None = None) -> torch.Tensor:
    """(N, c, h, w) uint8 -> (N, c, R, R): pad small images with the background, else resize + centre-crop.

    `background=None` uses the per-image, per-channel median of the border pixels.
    """
    n, c, h, w = x.shape
    if (h, w) == (resolution, resolution):
        return x
    if _should_pad(h, w, resolution):
        top, left = (resolution - h) // 2, (resolution - w) // 2
        if background is None:
            border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (N, c, 2h+2w)
            fill = border.median(dim=-1).values[..., None, None]  # (N, c, 1, 1)
        else:
            fill = torch.tensor(background, dtype=torch.uint8)
        out = fill.expand(n, c, resolution, resolution).clone()  # (N, c, R, R)
        out[..., top:top + h, left:left + w] = x
        return out
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    y = F.interpolate(x.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    y = y[..., top:top + resolution, left:left + resolution]
    return y.round().clamp(0, 255).to(torch.uint8)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, c, H, W) -> `channels` (1 or 3): grey repeats; colour -> ITU-R 601 luma (as PIL's 'L')."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1] (the official (x / 255 - 0.5) * 2)."""
    return x.float() / 127.5 - 1.0


def load_image(path: str | os.PathLike, resolution: int, channels: int) -> torch.Tensor:
    """One image file -> float (c, H, W) in [-1, 1]."""
    return to_float(torch.from_numpy(load_image_array(path, resolution, channels)))


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


class InfiniteBatches:
    """Endless shuffled batches for one rank, in DistributedSampler order, resumable at a given step.

    Each epoch is a fresh DistributedSampler permutation (seeded by seed + epoch); a batch never straddles
    epochs (drop_last), so step s always maps to the same indices whatever the restart point.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0):
        from torch.utils.data import DistributedSampler

        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=len(dataset) >= world_size)
        self.per_epoch = max(1, len(self.sampler) // batch_size)
        if len(self.sampler) < batch_size:
            log.warning("dataset has %d images per rank, fewer than the batch size %d: batches repeat images",
                        len(self.sampler), batch_size)
        self.step = start_step
        self._epoch, self._order = -1, None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(self.step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            order = torch.tensor(list(self.sampler), dtype=torch.long)
            if len(order) < self.batch_size:  # tiny data sets: tile the permutation
                order = order.repeat(-(-self.batch_size // len(order)))
            self._epoch, self._order = epoch, order
        self.step += 1
        return self.dataset.get_batch(self._order[k * self.batch_size:(k + 1) * self.batch_size])


def eval_indices(n: int, num_images: int | None) -> torch.Tensor:
    """Evenly spaced indices (deterministic, and they cover every class of a class-sorted folder)."""
    if num_images is None or num_images >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, num_images).round().long()


# ----------------------------------------------------------------------------------------------
# Token cache
# ----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    for name, t in tokenizer.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _encode_bits(tokenizer, images: torch.Tensor) -> torch.Tensor:
    """+-1 bits of each token: the codes of a binary tokenizer, the index bits of a VQ one."""
    config = getattr(tokenizer, "config", None)
    if getattr(config, "quantizer", "binary") == "vq":
        from bitdance.models.quantizer import indices_to_bits

        return indices_to_bits(tokenizer.encode_indices(images), config.group_size)  # (b, k, h, w)
    return tokenizer.encode(images)


@torch.no_grad()
def encode_dataset(tokenizer, dataset: ImageDataset, batch_size: int, device, cache_path,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image once -> (codes int8 (N, k, h, w) of +-1, labels int64 (N,)), cached in a safetensors
    file keyed by tokenizer + dataset fingerprints; a cache made by another tokenizer or data set is rebuilt.

    For a VQ tokenizer the codes are the bits of its group indices (`tokenizer.decode_indices(
    bits_to_indices(codes, group_size))` decodes them). Under DDP the trainer splits the work with
    `encode_images` and joins the shares with `write_token_cache` instead."""
    key = token_cache_key(tokenizer, dataset)
    cached = read_token_cache(cache_path, key)
    if cached is not None:
        return cached
    codes, labels = encode_images(tokenizer, dataset, batch_size, device, progress=progress)
    write_token_cache(cache_path, codes, labels, key, dataset.source)
    return codes, labels


def token_cache_key(tokenizer, dataset: ImageDataset) -> str:
    return f"{tokenizer_fingerprint(tokenizer)}-{dataset.fingerprint()}"


def read_token_cache(cache_path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes, labels) from a token cache made with `key`, or None (missing, stale or unreadable)."""
    from safetensors import safe_open

    cache_path = Path(cache_path)
    if not cache_path.is_file():
        return None
    try:
        with safe_open(str(cache_path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == key:
                log.info("using cached tokens %s", cache_path)
                return f.get_tensor("codes"), f.get_tensor("labels")
        log.info("token cache %s was made from another tokenizer or data set; re-encoding", cache_path)
    except Exception as e:
        log.warning("ignoring unreadable token cache %s: %s", cache_path, _short(e))
    return None


def write_token_cache(cache_path, codes: torch.Tensor, labels: torch.Tensor, key: str, source: str) -> None:
    from safetensors.torch import save_file

    with atomic_path(cache_path) as tmp:
        save_file({"codes": codes.contiguous(), "labels": labels.contiguous()}, str(tmp),
                  metadata={"fingerprint": key, "source": source})


def encode_images(tokenizer, dataset: ImageDataset, batch_size: int, device, start: int = 0,
                  stop: int | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode images start..stop-1 -> (codes int8 (n, k, h, w) of +-1, labels (n,))."""
    from tqdm import tqdm

    stop = len(dataset) if stop is None else stop
    skipped_before = getattr(dataset, "skipped", 0)  # those were reported when the folder was indexed
    device = torch.device(device)
    was_training = tokenizer.training
    tokenizer = tokenizer.to(device).eval()
    codes, labels = [], []
    for s in tqdm(range(start, stop, batch_size), desc="encoding", unit="batch", disable=not progress):
        images, y = dataset.get_batch(torch.arange(s, min(s + batch_size, stop)))
        c = _encode_bits(tokenizer, images.to(device))  # (b, k, h, w) of +-1
        codes.append(c.to(torch.int8).cpu())
        labels.append(y)
    tokenizer.train(was_training)
    newly = getattr(dataset, "skipped", 0) - skipped_before
    if newly:
        log.warning("%d unreadable image(s) were skipped while encoding", newly, extra={"rank_local": True})
    if not codes:  # an empty share (more ranks than images)
        return torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.long)
    return torch.cat(codes), torch.cat(labels)
