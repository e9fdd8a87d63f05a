"""Frechet Inception Distance (Heusel et al. 2017) over Inception-v3 pool3 features.

We do not ship or rebuild Inception: the user provides the TorchScript translation of the
2015-12-05 TensorFlow graph that StyleGAN2-ADA, EDM and clean-fid use. It takes uint8-range
images [N, 3, H, W] of any size (it resizes to 299 itself) and, called with
return_features=True, returns the 2048 pool3 features [N, 2048].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_HELP = (
    "FID needs the Inception-v3 weights as a TorchScript file: download\n"
    f"  {INCEPTION_URL}\n"
    "(the StyleGAN2-ADA / EDM / clean-fid translation of TensorFlow's inception-2015-12-05, about 100 MB) "
    "and pass --inception /path/to/inception-2015-12-05.pt. pytorch-fid's pt_inception-2015-12-05-*.pth "
    "is a state dict for its own Python module and cannot be loaded here."
)


class InceptionError(ValueError):
    """The Inception weights are missing or are not the TorchScript feature extractor."""


def load_inception(path: str | os.PathLike | None, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    if path is None:
        raise InceptionError(INCEPTION_HELP)
    path = Path(path)
    if not path.is_file():
        raise InceptionError(f"{path}: no such file.\n{INCEPTION_HELP}")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as exc:
        raise InceptionError(f"{path}: not a TorchScript file ({exc.__class__.__name__}).\n{INCEPTION_HELP}") from exc


@torch.inference_mode()
def inception_features(
    detector: torch.jit.ScriptModule, images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 100
) -> np.ndarray:
    """pool3 features [N, D] (float64) of uint8 images [N, C, H, W]; grayscale is repeated to RGB."""
    features = []
    for batch in images.split(batch_size):
        if batch.shape[1] == 1:
            batch = batch.repeat(1, 3, 1, 1)
        out = detector(batch.to(device), return_features=True)
        if out.dim() != 2 or out.shape[0] != batch.shape[0]:
            raise InceptionError(f"the Inception module returned shape {tuple(out.shape)}, expected [N, 2048] features")
        features.append(out.double().cpu())
    return torch.cat(features).numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, as pytorch-fid and the TF code) of features [N, D]."""
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues (round-off) -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0.0))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the right side is symmetric PSD, so
    eigh is enough (scipy's sqrtm on the non-symmetric product returns complex round-off)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    root1 = psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0.0)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
