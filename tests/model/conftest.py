"""Data fixtures for the model tests: the shared MNIST file (skipped when absent) and a
synthetic MNIST-format file, so most tests run on a bare clone too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data import DATASET_FILES, DEFAULT_DATA_DIR


def shared_dataset(name: str) -> Path:
    path = DEFAULT_DATA_DIR / DATASET_FILES[name]
    if not path.is_file():
        pytest.skip(f"{path} is absent: the shared {name} data file is needed (set DDPM_DATA_DIR to its folder)")
    return path


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    return shared_dataset("mnist")


@pytest.fixture(scope="session")
def cifar10_path() -> Path:
    return shared_dataset("cifar10")


def synthetic_digits(count: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [count, 28, 28]: one bright bar per image at a random place, on black, like MNIST's range."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for image in images:
        row, col = rng.integers(4, 20, size=2)
        if rng.random() < 0.5:
            image[row : row + 3, 4:24] = 255
        else:
            image[4:24, col : col + 3] = 255
    return images


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory) -> Path:
    """An MNIST-format npz (x_train 256 images, x_test 32) written for the tests."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "synthetic-mnist.npz"
    np.savez(path, x_train=synthetic_digits(256, rng), y_train=np.zeros(256, np.uint8),
             x_test=synthetic_digits(32, rng), y_test=np.zeros(32, np.uint8))
    return path


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin-wait on each other and a
    tiny training step gets ~10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
