"""Fixtures any layer's tests can share: a tiny DDPM with random weights, in memory and on disk;
the device the model and engine suites run on (DDPM_TEST_DEVICE)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

# Before torch loads OpenMP: on a busy CPU (a training run beside the tests, a shared CI
# runner) threads spinning at every barrier made a tiny U-Net forward ~30x slower here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import model  # noqa: E402

pytest_plugins = ["tests.redis_server"]  # the `redis_server` fixture, for any test that asks for it


def randomize_weights_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise, the zero-initialised output layers included.

    A fresh U-Net predicts eps = 0 (its last layers start at zero), which would let most
    comparisons pass trivially. Norm scales (the only 1-D weights) stay near 1 so signals
    keep their size through the network."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            centre = 1.0 if param.dim() == 1 and name.endswith("weight") else 0.0
            param.copy_(centre + noise)
    return module


TEST_DEVICE_VARIABLE = "DDPM_TEST_DEVICE"
TEST_DEVICE = pytest.StashKey[torch.device]()


def parse_test_device(value: str | None) -> torch.device:
    """The device DDPM_TEST_DEVICE names: unset or empty means the CPU; else cpu, cuda or cuda:N,
    which must exist on this machine (ValueError otherwise, saying why)."""
    text = (value or "").strip()
    if not text:
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{TEST_DEVICE_VARIABLE}={value!r} is not a device the tests run on: use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{TEST_DEVICE_VARIABLE}={value} asks for CUDA, but this torch ({torch.__version__}) "
                         f"sees no CUDA device here; unset it to run the tests on the CPU")
    index, count = device.index or 0, torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{TEST_DEVICE_VARIABLE}={value} needs GPU {index}, but {count} are visible")
    return torch.device("cuda", index)


def pytest_configure(config: pytest.Config) -> None:
    """A device asked for but absent ends the session at once, before any test: never a silent skip."""
    try:
        config.stash[TEST_DEVICE] = parse_test_device(os.environ.get(TEST_DEVICE_VARIABLE))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


@pytest.fixture(scope="session")
def test_device(pytestconfig) -> torch.device:
    """Where the model and engine suites put the models whose device matters: DDPM_TEST_DEVICE,
    default the CPU. On CUDA, TF32 is off for the session, as the engine serves
    (serve_in_full_fp32): the suite's references are float32."""
    device = pytestconfig.stash[TEST_DEVICE]
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def on_device(ddpm: model.DDPM, device: torch.device) -> model.DDPM:
    """`ddpm` itself if it is on `device`, else a copy there (weights, config and info)."""
    if ddpm.device == device:
        return ddpm
    return model.DDPM(copy.deepcopy(ddpm.unet).to(device), ddpm.config, ddpm.info)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (marked gpu)")


@pytest.fixture(autouse=True)
def auto_dtype_is_float32(monkeypatch):
    """model.load's dtype="auto" means float32 in every test, on every machine: the suite's
    references are float32, and auto picks bfloat16 on a CPU or GPU with native bf16.
    tests/model/test_precision.py tests that choice against the real detection."""
    from model import precision

    monkeypatch.setattr(precision, "computes_bf16_natively", lambda device: False)


@pytest.fixture(scope="session")
def randomize_weights() -> Callable[..., torch.nn.Module]:
    return randomize_weights_


@pytest.fixture(scope="session")
def tiny_ddpm() -> model.DDPM:
    """The `tiny` preset (28x28x1, T=50) with random weights. Shared: do not modify it."""
    config = model.preset("tiny")
    unet = randomize_weights_(model.UNet(config.unet)).eval()
    return model.DDPM(unet, config, info={"source": "tests"})


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_ddpm) -> Path:
    """tiny_ddpm saved as one of our .safetensors files, for code that loads weights by path."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    model.save(tiny_ddpm, path)
    return path
