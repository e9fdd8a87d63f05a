"""A sample-quality score for MNIST-like models (1x28x28) that needs no download.

A small CNN is trained on the MNIST training set by ddpm-eval itself (two epochs: 98.9% test
accuracy, about 3 CPU-minutes) and cached on disk, keyed by the data file's content. It scores a
set of uint8 images by

  confident_share  the share it classifies with probability >= 0.9: a malformed digit is one
                   that no class claims;
  classes          the classes of those confident images and their counts: a model that draws
                   only some digits covers fewer than 10;
  frechet          the Frechet distance between the images' penultimate features (128-d) and the
                   training set's: FID's formula in this classifier's features.

Every figure is also computed for real test images, the reference, at the same n: the Frechet
distance of a finite set is biased upwards by an amount that shrinks with its size, so only
figures at the same n compare. The reference figures are means over disjoint random sets of n
test images, with the Frechet distance's spread over those sets: the noise of one set's figure.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .data import DatasetError, load_mnist, to_model_range
from .fid import feature_statistics, frechet_distance

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
CONFIDENCE = 0.9
# Part of the cache key: bump it when the architecture or the training recipe changes.
RECIPE = "cnn1"
CACHE_ENV = "DDPM_CACHE_DIR"


class DigitClassifier(nn.Module):
    """Two conv + pool stages and one hidden layer: ~99% on MNIST after two epochs, cheap enough
    to train on a CPU in a few minutes."""

    def __init__(self, feature_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 14 x 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 7 x 7
            nn.Flatten(), nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def default_cache_dir() -> Path:
    """$DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm-serve, else ~/.cache/ddpm-serve."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-serve"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_labelled_mnist(path: Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, 28, 28] and long labels [N] of an MNIST npz (model.data reads no labels)."""
    images = load_mnist(path, split, limit)
    with np.load(path) as data:
        if f"y_{split}" not in data:
            raise DatasetError(f"{path}: no y_{split} labels; the quality score trains a classifier and needs them")
        labels = torch.from_numpy(data[f"y_{split}"][:limit].astype(np.int64))
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{path}: y_{split} must hold one label 0..9 per image")
    return images, labels


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 2, batch_size: int = 128,
                     seed: int = 0, device: torch.device | str = "cpu") -> DigitClassifier:
    """Adam, learning rate decayed linearly to 0 (what gets two epochs to ~99%), seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = DigitClassifier().to(device)
    total_steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    classifier.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            x, y = to_model_range(images[batch]).to(device), labels[batch].to(device)
            loss = F.cross_entropy(classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifier.eval()


@torch.inference_mode()
def classify(classifier: DigitClassifier, images: torch.Tensor,
             batch_size: int = 500) -> tuple[torch.Tensor, np.ndarray]:
    """Class probabilities [N, 10] and penultimate features [N, 128] (float64) of uint8 images."""
    device = next(classifier.parameters()).device
    probabilities, features = [], []
    for batch in images.split(batch_size):
        hidden = classifier.features(to_model_range(batch).to(device))
        probabilities.append(classifier.head(hidden).softmax(dim=1).cpu())
        features.append(hidden.double().cpu())
    return torch.cat(probabilities), torch.cat(features).numpy()


@dataclass
class Scorer:
    """The classifier, the feature statistics of its training set, and how it was made."""

    classifier: DigitClassifier
    reference_mu: np.ndarray
    reference_sigma: np.ndarray
    info: dict

    def score(self, images: torch.Tensor) -> dict:
        """The figures of uint8 images [N, 1, 28, 28], N >= 2."""
        if tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"the score takes images of shape {IMAGE_SHAPE}, got {tuple(images.shape[1:])}")
        probabilities, features = classify(self.classifier, images)
        confidence, predicted = probabilities.max(dim=1)
        confident = confidence >= CONFIDENCE
        counts = torch.bincount(predicted[confident], minlength=NUM_CLASSES).tolist()
        mu, sigma = feature_statistics(features)
        return {"n": len(images), "confident_share": confident.float().mean().item(),
                "classes": sum(c > 0 for c in counts), "class_counts": counts,
                "frechet": frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)}

    def mean_score(self, images: torch.Tensor, n: int, seed: int = 0) -> dict:
        """Each figure's mean over disjoint random sets of n of `images` (at least one), and in
        frechet_std the spread of the Frechet distance over them (None for a single set).

        Random, not consecutive: MNIST's test set is ordered (its second half is another
        population of writers), and consecutive sets of 256 gave Frechet distances of 21 to 104
        where shuffled ones gave 19 +- 3.5."""
        if not 2 <= n <= len(images):
            raise ValueError(f"need sets of 2 to {len(images)} images, got {n}")
        shuffled = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
        scores = [self.score(shuffled[start : start + n]) for start in range(0, len(shuffled) - n + 1, n)]
        frechet = np.array([score["frechet"] for score in scores])
        return {"n": n, "sets": len(scores),
                **{key: float(np.mean([score[key] for score in scores])) for key in ("confident_share", "classes")},
                "class_counts": np.mean([score["class_counts"] for score in scores], axis=0).tolist(),
                "frechet": float(frechet.mean()), "frechet_std": float(frechet.std(ddof=1)) if len(scores) > 1 else None}


def cache_path(cache_dir: Path, data_sha256: str, epochs: int) -> Path:
    return cache_dir / f"mnist-classifier-{RECIPE}-e{epochs}-{data_sha256[:16]}.safetensors"


def build_scorer(data_path: Path, epochs: int, device: torch.device | str) -> Scorer:
    """Train the classifier, then measure it: test accuracy, and the training set's feature statistics."""
    images, labels = load_labelled_mnist(data_path, "train")
    started = time.perf_counter()
    classifier = train_classifier(images, labels, epochs, device=device)
    train_seconds = time.perf_counter() - started
    mu, sigma = feature_statistics(classify(classifier, images)[1])
    test_images, test_labels = load_labelled_mnist(data_path, "test")
    predicted = classify(classifier, test_images)[0].argmax(dim=1)
    info = {"test_accuracy": (predicted == test_labels).float().mean().item(), "train_seconds": train_seconds,
            "train_images": len(images), "epochs": epochs, "recipe": RECIPE}
    return Scorer(classifier, mu, sigma, info)


def save_scorer(scorer: Scorer, path: Path) -> None:
    """Atomically: a half-written cache file must never be read as a classifier."""
    tensors = {**{f"classifier.{k}": v.contiguous().cpu() for k, v in scorer.classifier.state_dict().items()},
               "reference.mu": torch.from_numpy(scorer.reference_mu),
               "reference.sigma": torch.from_numpy(scorer.reference_sigma)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"info": json.dumps(scorer.info)})
    os.replace(tmp, path)


def read_scorer(path: Path, device: torch.device | str) -> Scorer | None:
    """The cached scorer, or None when the file is unreadable (it is then rebuilt)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as file:
            info = json.loads(file.metadata()["info"])
        classifier = DigitClassifier()
        classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in tensors.items()
                                    if k.startswith("classifier.")})
        mu, sigma = tensors["reference.mu"].numpy(), tensors["reference.sigma"].numpy()
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError):
        return None
    return Scorer(classifier.to(device).eval(), mu, sigma, {**info, "cache": str(path), "cached": True})


def load_or_train_scorer(data_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, epochs: int = 2,
                         device: torch.device | str = "cpu", on_training: Callable[[Path], None] | None = None) -> Scorer:
    """The scorer for this MNIST file from the cache, trained (and cached) on first use;
    `on_training(cache file)` is called before training, which takes minutes."""
    data_path = Path(data_path)
    if not data_path.is_file():
        raise DatasetError(f"MNIST not found at {data_path}; pass --data-path /path/to/mnist.npz "
                           f"or --download to fetch it")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache_path(cache_dir, file_sha256(data_path), epochs)
    scorer = read_scorer(path, device) if path.is_file() else None
    if scorer is None:
        if on_training is not None:
            on_training(path)
        scorer = build_scorer(data_path, epochs, device)
        save_scorer(scorer, path)
        scorer.info.update(cache=str(path), cached=False)
    return scorer
