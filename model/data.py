"""Training and evaluation data, held in memory as uint8 [N, C, H, W] tensors.

Sources: the bundled MNIST (npz) and CIFAR-10 (tar of JPEGs) files of ../shared/data, or any
folder of images (recursive; resized and center-cropped). Errors name the path and the fix.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DEFAULT_DATA_DIR = Path(os.environ.get("DDPM_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DATASET_FILES = {"mnist": "mnist.npz", "cifar10": "cifar10-jpeg.tar.gz"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset that is missing or unreadable; the message says what to provide."""


def dataset_path(name: str, data_path: str | os.PathLike | None = None) -> Path:
    if data_path is not None:
        return Path(data_path)
    return DEFAULT_DATA_DIR / DATASET_FILES[name]


def load_mnist(path: Path, split: str, limit: int | None = None) -> torch.Tensor:
    try:
        with np.load(path) as data:
            images = data[f"x_{split}"][:limit]
    except FileNotFoundError:
        raise DatasetError(f"MNIST not found at {path}; pass --data-path /path/to/mnist.npz") from None
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"{path}: not a readable MNIST npz (keys x_train, x_test): {exc}") from exc
    return torch.from_numpy(images).unsqueeze(1)


def load_cifar10(path: Path, split: str, limit: int | None = None) -> torch.Tensor:
    images = []
    try:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar if m.isfile() and f"/{split}/" in m.name), key=lambda m: m.name)
            if limit:
                # The archive is sorted by class: spread a subset over it so every class appears.
                members = members[:: max(len(members) // limit, 1)][:limit]
            for member in members:
                raw = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    except FileNotFoundError:
        raise DatasetError(f"CIFAR-10 not found at {path}; pass --data-path /path/to/cifar10-jpeg.tar.gz") from None
    except (OSError, tarfile.TarError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: not a readable CIFAR-10 tar of JPEGs: {exc}") from exc
    if not images:
        raise DatasetError(f"{path}: no images under */{split}/ in the archive")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def load_folder(path: Path, image_size: int, channels: int, limit: int | None = None) -> torch.Tensor:
    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder of images (or pass 'mnist' / 'cifar10')")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise DatasetError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for file in files:
        try:
            with Image.open(file) as img:
                images.append(np.asarray(center_crop_resize(img.convert(mode), image_size)))
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"{file}: unreadable image: {exc}") from exc
    array = np.stack(images)
    array = array[:, None] if channels == 1 else array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array))


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def load_dataset(
    data: str,
    split: str = "train",
    data_path: str | None = None,
    image_size: int = 32,
    channels: int = 3,
    limit: int | None = None,
) -> torch.Tensor:
    """uint8 images [N, C, H, W]. `data` is 'mnist', 'cifar10' or a folder path (which has no splits).

    `limit` keeps N images (the first N; for CIFAR-10, N spread over all classes)."""
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be >= 1, got {limit}")
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'test'")
    if data == "mnist":
        images = load_mnist(dataset_path(data, data_path), split, limit)
    elif data == "cifar10":
        images = load_cifar10(dataset_path(data, data_path), split, limit)
    else:
        images = load_folder(Path(data), image_size, channels, limit)
    if images.shape[1] != channels or images.shape[-1] != image_size:
        raise DatasetError(
            f"{data}: images are {tuple(images.shape[1:])} but the model expects "
            f"({channels}, {image_size}, {image_size}); pick a matching --preset"
        )
    return images


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save float [-1, 1] images [N, C, H, W] as one PNG grid with 2-pixel gaps."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 2
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = pixels[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
