"""Datasets: folders of images, the MNIST/CIFAR-10 files, limits, clear errors, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import DatasetError, load_dataset, save_grid, to_model_range, to_uint8


def test_folder_of_images_is_cropped_resized_and_converted(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), color=(255, 0, 0)).save(tmp_path / "a.png")  # wide: center-cropped to 20x20
    Image.new("L", (8, 8), color=128).save(tmp_path / "sub" / "b.png")  # recursive, grayscale -> RGB
    Image.new("RGB", (16, 16), color=(0, 0, 255)).save(tmp_path / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")

    images = load_dataset(str(tmp_path), image_size=12, channels=3)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 12, 12)
    assert images[0, :, 6, 6].tolist() == [255, 0, 0]  # files in sorted path order: a.png, c.jpg, sub/b.png
    assert images[2, :, 6, 6].tolist() == [128, 128, 128]
    gray = load_dataset(str(tmp_path), image_size=12, channels=1, limit=2)
    assert gray.shape == (2, 1, 12, 12)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="no such folder of images"):
        load_dataset(str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png: unreadable image"):
        load_dataset(str(tmp_path))


def test_mnist_file_limit_and_shape_checks(synthetic_mnist):
    images = load_dataset("mnist", "test", str(synthetic_mnist), image_size=28, channels=1, limit=5)
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.uint8
    with pytest.raises(DatasetError, match=r"model expects \(3, 32, 32\); pick a matching --preset"):
        load_dataset("mnist", "train", str(synthetic_mnist), image_size=32, channels=3)
    with pytest.raises(DatasetError, match="--limit must be >= 1"):
        load_dataset("mnist", "train", str(synthetic_mnist), image_size=28, channels=1, limit=0)


def test_missing_or_unreadable_dataset_files(tmp_path):
    with pytest.raises(DatasetError, match="MNIST not found at .*; pass --data-path"):
        load_dataset("mnist", "train", str(tmp_path / "mnist.npz"), 28, 1)
    with pytest.raises(DatasetError, match="CIFAR-10 not found at .*; pass --data-path"):
        load_dataset("cifar10", "train", str(tmp_path / "cifar.tar.gz"))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="not a readable MNIST npz"):
        load_dataset("mnist", "train", str(garbage), 28, 1)
    with pytest.raises(DatasetError, match="not a readable CIFAR-10 tar"):
        load_dataset("cifar10", "train", str(garbage))



def test_npz_arrays_of_another_type_or_layout_are_refused(tmp_path):
    floats, rgb_first = tmp_path / "mnist.npz", tmp_path / "cifar10.npz"
    np.savez(floats, x_train=np.zeros((2, 28, 28), np.float32))
    np.savez(rgb_first, x_train=np.zeros((2, 3, 32), np.uint8))
    with pytest.raises(DatasetError, match=r"x_train is float32 \(2, 28, 28\); expected uint8 \(N, 28, 28\)"):
        load_dataset("mnist", "train", str(floats), 28, 1)
    with pytest.raises(DatasetError, match=r"x_train is uint8 \(2, 3, 32\); expected uint8 \(N, 32, 32, 3\)"):
        load_dataset("cifar10", "train", str(rgb_first))

def test_real_mnist_test_split(mnist_path):
    images = load_dataset("mnist", "test", str(mnist_path), 28, 1, limit=10)
    assert images.shape == (10, 1, 28, 28)
    assert 20 < images.float().mean().item() < 50  # MNIST's mean pixel is about 33


def test_cifar10_limit_spreads_over_the_classes(cifar10_path):
    images = load_dataset("cifar10", "test", str(cifar10_path), 32, 3, limit=10)
    assert images.shape == (10, 3, 32, 32)
    # One image per class: no two of them are the same picture.
    assert len({img.numpy().tobytes() for img in images}) == 10


def test_range_round_trip_and_grid(tmp_path):
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_model_range(pixels)), pixels)
    assert to_model_range(pixels).min() == -1 and to_model_range(pixels).max() == 1

    save_grid(to_model_range(pixels.repeat(5, 3, 1, 1)), tmp_path / "grid.png", nrow=3)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 + 3 * 18, 2 + 2 * 18) and grid.mode == "RGB"
        assert np.asarray(grid)[2, 2 + 15].tolist() == [15, 15, 15]
