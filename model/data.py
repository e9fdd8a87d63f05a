"""Training and evaluation data, held in memory as uint8 [N, C, H, W] tensors.

Sources (`data`: 'mnist', 'cifar10' or a folder; the file from --data-path, by default from
../shared/data or $DDPM_DATA_DIR; `ddpm-train --download` writes the npz files from the
official releases, see model.download):

  mnist    an .npz (np.load, no pickle; Keras' mnist.npz layout) with
           x_train uint8 (N, 28, 28) and x_test uint8 (M, 28, 28): grayscale 0..255, 0 = background.
           y_train / y_test (uint8 labels 0..9) may be there too; they are not read.
  cifar10  an .npz as above with x_train uint8 (N, 32, 32, 3) and x_test uint8 (M, 32, 32, 3),
           RGB, channels last (Keras' layout; what --download writes), or
           a tar (.tar.gz) of images whose paths hold /train/ or /test/, such as
           cifar10/train/<class>/NNNN.jpg (../shared/data/cifar10-jpeg.tar.gz), decoded as RGB.
  folder   any images under it (recursive: png, jpg, bmp, gif, webp, tif), center-cropped to a
           square, resized to the model's image size and converted to its channels (1: grayscale,
           3: RGB). A folder has no splits.

Errors name the path and the fix.
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


def load_npz(path: Path, split: str, limit: int | None, name: str, shape: str, ndim: int) -> np.ndarray:
    """x_{split} of an npz file: uint8, `ndim` dimensions (`shape` says which, for errors)."""
    try:
        with np.load(path) as data:
            images = data[f"x_{split}"][:limit]
    except FileNotFoundError:
        raise DatasetError(f"{name} not found at {path}; pass --data-path /path/to/{path.name} "
                           f"or --download to fetch it") from None
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"{path}: not a readable {name} npz (keys x_train, x_test): {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != ndim:
        raise DatasetError(f"{path}: x_{split} is {images.dtype} {images.shape}; expected uint8 {shape}")
    return images


def load_mnist(path: Path, split: str, limit: int | None = None) -> torch.Tensor:
    return torch.from_numpy(load_npz(path, split, limit, "MNIST", "(N, 28, 28)", 3)).unsqueeze(1)


def load_cifar10(path: Path, split: str, limit: int | None = None) -> torch.Tensor:
    if path.suffix == ".npz":
        images = load_npz(path, split, limit, "CIFAR-10", "(N, 32, 32, 3)", 4)
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
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
        raise DatasetError(f"CIFAR-10 not found at {path}; pass --data-path /path/to/cifar10-jpeg.tar.gz "
                           f"(or cifar10.npz) or --download to fetch it") from None
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
            f"({channels}, {image_size}, {image_size}); pick a matching --preset (or --channels)"
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
