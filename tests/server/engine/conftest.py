"""Engine test helpers: a U-Net that tests can pause, slow down or make fail; a running engine."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import model
from model.data import to_uint8
from server.contract import Done, EngineConfig, GenerationSpec, validate
from server.engine import Engine
from server.contract.channel import ChannelHandle
from tests.conftest import on_device


class ControlledUNet(torch.nn.Module):
    """Wraps a U-Net. `gate` cleared: calls wait; `delay_s`: each call sleeps;
    `fault(batch_size)` returning an exception: the call raises it."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.fault: Callable[[int], Exception | None] | None = None
        self.batch_sizes: list[int] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert self.gate.wait(timeout=60), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fault is not None and (error := self.fault(x.shape[0])) is not None:
            raise error
        self.batch_sizes.append(x.shape[0])
        return self.unet(x, t)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny batches on a shared CPU: one intra-op thread is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ddpm(tiny_ddpm, test_device) -> model.DDPM:
    """The engine suite's tiny_ddpm is the shared one on the test device (DDPM_TEST_DEVICE): the
    engines and the reference images they are compared with run there."""
    return on_device(tiny_ddpm, test_device)


@pytest.fixture
def controlled_ddpm(tiny_ddpm) -> model.DDPM:
    """tiny_ddpm's weights behind a ControlledUNet (at .unet); tiny_ddpm stays the reference.
    A fault that only a step should meet is set once the engine has started: on CUDA the
    warm-up calls the U-Net at every power-of-two batch size (on a CPU once, at batch 1)."""
    return model.DDPM(ControlledUNet(tiny_ddpm.unet), tiny_ddpm.config, tiny_ddpm.info)


@asynccontextmanager
async def running_engine(ddpm: model.DDPM, config: EngineConfig = EngineConfig(), **kwargs):
    engine = Engine(ddpm, config, **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        if isinstance(ddpm.unet, ControlledUNet):
            ddpm.unet.gate.set()
        await engine.shutdown(grace_s=0)


def submit(engine: Engine, spec: GenerationSpec) -> ChannelHandle:
    """Validates `spec` against the engine's limits, as the API does, and submits it."""
    return engine.submit(validate(spec, engine.model_info().limits))


def run(coroutine, timeout_s: float = 120.0):
    """Runs an async test body with a hard limit, so a hung engine fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def decode_png(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def assert_images_match(done: Done, reference: torch.Tensor) -> None:
    """The PNGs of `done` equal the reference [n, 1, H, W] images to within one grey level
    (batch sizes may change the last bits of a convolution)."""
    assert [image.index for image in done.images] == list(range(reference.shape[0]))
    for image, expected in zip(done.images, reference, strict=True):
        got = decode_png(image.png).astype(int)
        want = to_uint8(expected)[0].cpu().numpy().astype(int)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1, f"image {image.index} differs from the reference"


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
