"""A small CNN classifier for class consistency: does a sample of class y look like class y?

Trained on the data set's train split (`train_classifier`), it scores generated samples
(`accuracy(classifier, samples, labels)`), next to its accuracy on the real test split, which is the
ceiling a perfect generator could reach. The class names travel with the saved model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bitdance.data import convert_channels, fit_uint8, to_float
from bitdance.evaluation.fid import signed_to_uint8
from bitdance.utils import CONFIG_NAME, PretrainedMixin, UserError, cosine_lr, ensure_output_dir, write_json


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    resolution: int = 32  # inputs of another size are resized to this
    width: int = 16  # channels of the first stage; doubled at each of the three stages
    class_names: tuple[str, ...] = ()


def fmnist() -> ClassifierConfig:
    """Fashion-MNIST at 32x32: 73 k parameters, ~91% test accuracy after 1000 steps of 128."""
    return ClassifierConfig(in_channels=1, num_classes=10, resolution=32, width=16)


def tiny() -> ClassifierConfig:
    """Unit tests."""
    return ClassifierConfig(width=8)


CLASSIFIER_PRESETS = {"fmnist": fmnist, "tiny": tiny}


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class Classifier(nn.Module, PretrainedMixin):
    """Three conv stages (two 3x3 convs + BN + ReLU each, max-pool between), global average pool, linear."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.features = nn.Sequential(
            _stage(config.in_channels, w), nn.MaxPool2d(2),
            _stage(w, 2 * w), nn.MaxPool2d(2),
            _stage(2 * w, 4 * w),
        )
        self.head = nn.Linear(4 * w, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (b, c, H, W) in [-1, 1] -> logits (b, num_classes)."""
        h = self.features(x)  # (b, 4w, H/4, W/4)
        return self.head(h.mean(dim=(2, 3)))  # (b, num_classes)

    def prepare(self, images) -> torch.Tensor:
        """uint8 (n, H, W, c) or float (n, c, H, W) in [-1, 1] -> float (n, c', R, R) the network expects.

        Images of another size or channel count are fitted as a data folder's images are when loaded
        (`data.fit_uint8`: smaller ones padded with their border colour, larger ones resized and centre-cropped;
        colour to luma), not stretched. IDX data are padded with black, which is their border colour, so 28x28
        Fashion-MNIST-like samples are padded as the training images were."""
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        c, r = self.config.in_channels, self.config.resolution
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2)  # (n, c, H, W)
        elif (x.shape[1], *x.shape[-2:]) == (c, r, r):
            return x.float()
        else:
            x = signed_to_uint8(x)  # (n, c, H, W) uint8, as an image file of the sample would hold
        if x.shape[1] not in (1, 3):
            raise UserError(f"classifier wants {c}-channel images, got {x.shape[1]} channels")
        return to_float(convert_channels(fit_uint8(x, r), c))  # (n, c', R, R)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels (n,) for uint8 (n, H, W, c) or float (n, c, H, W) images."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            out.append(self(self.prepare(images[start:start + batch_size]).to(device)).argmax(1).cpu())
        self.train(was_training)
        return torch.cat(out)


def accuracy(classifier: Classifier, images, labels, batch_size: int = 256) -> float:
    """Share of `images` the classifier assigns to `labels` (class consistency for samples)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)  # (n,)
    if labels.shape[0] != len(images):
        raise UserError(f"{labels.shape[0]} labels for {len(images)} images")
    outside = labels[(labels < 0) | (labels >= classifier.config.num_classes)]
    if outside.numel():  # -1 marks an unlabelled image: it has no class to be consistent with
        raise UserError(f"label {int(outside[0])} is outside the classifier's "
                        f"{classifier.config.num_classes} classes")
    return (classifier.predict(images, batch_size) == labels).double().mean().item()


def _dataset_tensors(dataset, desc: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in memory: float images (N, c, H, W) in [-1, 1], labels (N,)."""
    xs, ys = [], []
    for start in tqdm(range(0, len(dataset), 1024), desc=desc, disable=not progress):
        idx = torch.arange(start, min(start + 1024, len(dataset)))
        if hasattr(dataset, "get_batch"):
            x, y = dataset.get_batch(idx)
        else:
            items = [dataset[int(i)] for i in idx]
            x, y = torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig, steps: int,
                   batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 1e-4,
                   generator: torch.Generator | None = None, device=None,
                   progress: bool = True) -> Classifier:
    """Train a fresh classifier on in-memory float images (N, c, H, W) in [-1, 1] and labels (N,)."""
    generator = generator or torch.Generator().manual_seed(0)
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = Classifier(config)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(100, steps // 10)
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, lr, warmup, steps)
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x = model.prepare(images[idx]).to(device)  # (b, c, R, R)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def train_classifier(data_path: str | os.PathLike, out_dir: str | os.PathLike, steps: int = 1000,
                     batch_size: int = 128, lr: float = 3e-3, preset: str = "fmnist",
                     resolution: int | None = None, channels: int | None = None, width: int | None = None,
                     seed: int = 0, device=None, progress: bool = True) -> dict:
    """Train on `data_path`'s train split, report accuracy on its test split, save to `out_dir`.

    The preset gives resolution and width (overridable); channels and classes come from the data.
    Writes `config.json` + `model.safetensors` (class names in the config) and `metrics.json`.
    """
    from bitdance.evaluation.fid import open_dataset

    # checked before the data are loaded: a bad value would fail only once training runs, or (width 0) quietly
    # mean the preset's
    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--width", width)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not 0 < lr < float("inf"):  # NaN fails this too
        raise UserError(f"--lr must be a positive number, got {lr}")
    if resolution is not None and resolution < 4:  # the network halves it twice
        raise UserError(f"--resolution must be at least 4, got {resolution}")
    ensure_output_dir(Path(out_dir) / CONFIG_NAME)  # an unwritable out_dir fails now, not after training
    if preset not in CLASSIFIER_PRESETS:
        raise UserError(f"unknown classifier preset {preset!r}; choose from {', '.join(CLASSIFIER_PRESETS)}")
    base = CLASSIFIER_PRESETS[preset]()
    resolution = resolution or base.resolution
    width = width or base.width
    start = time.time()
    train = open_dataset(data_path, resolution, channels, "train")
    x, y = _dataset_tensors(train, "loading train split", progress)
    if int(y.min()) < 0:
        raise UserError(f"{data_path} has unlabelled images; the classifier needs class subfolders or IDX")
    if getattr(train, "class_names", None):
        names = tuple(train.class_names)
    else:
        names = tuple(str(i) for i in range(int(y.max()) + 1))
    num_classes = len(names)
    config = ClassifierConfig(in_channels=x.shape[1], num_classes=num_classes, resolution=resolution,
                              width=width, class_names=names)
    model = fit_classifier(x, y, config, steps, batch_size=batch_size, lr=lr,
                           generator=torch.Generator().manual_seed(seed), device=device, progress=progress)
    train_time = time.time() - start
    metrics = {"preset": preset, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
               "resolution": resolution, "width": width,
               "train_images": int(x.shape[0]), "train_time_s": round(train_time, 1),
               "train_accuracy": accuracy(model, x[:10_000], y[:10_000]), "test_accuracy": None}
    try:
        test = open_dataset(data_path, resolution, channels, "test")
    except UserError:
        test = None  # no separate test split: report the train accuracy only
    if test is not None and test.source == train.source:
        test = None  # a folder without train/ and test/ serves every split whole: nothing is held out
    if test is None:
        metrics["note"] = f"{data_path} has no held-out test split: test_accuracy is not measured"
    else:
        tx, ty = _dataset_tensors(test, "loading test split", progress)
        metrics["test_accuracy"] = accuracy(model, tx, ty)
        metrics["test_images"] = int(tx.shape[0])
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    write_json(metrics, out_dir / "metrics.json")
    metrics["out"] = str(out_dir)
    return metrics


def load_classifier(directory: str | os.PathLike, device=None) -> Classifier:
    return Classifier.from_pretrained(directory, device=device or "cpu")


def real_test_accuracy(classifier: Classifier, data_path, split: str = "test",
                       progress: bool = True) -> float:
    """Accuracy on real images of `data_path` at the classifier's resolution and channels."""
    from bitdance.evaluation.fid import open_dataset

    ds = open_dataset(data_path, classifier.config.resolution, classifier.config.in_channels, split)
    x, y = _dataset_tensors(ds, f"loading {split} split", progress)
    return accuracy(classifier, x, y)


__all__ = ["ClassifierConfig", "Classifier", "CLASSIFIER_PRESETS", "accuracy", "fit_classifier",
           "train_classifier", "load_classifier", "real_test_accuracy"]
