"""Each image's random numbers: x_T, then one z per step, from its own CPU generator.

Image i of a request draws from image_generator(seed, i) on the CPU whatever device the model
runs on, so a seed gives the same numbers on every device; they reach the device in one
non-blocking copy per batch (stack_to). A stream draws many steps at once: torch's CPU normal
fill turns uniforms into normals in blocks of 16 and redraws a tail that is not a multiple of
16, so one [k, C, H, W] draw equals k draws of [C, H, W] exactly when C*H*W is a multiple of
16 (28x28, 3x32x32, ...). Other shapes draw one image at a time, so every seed keeps its image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import image_generator

NORMAL_FILL_BLOCK = 16  # torch's CPU normal fill (aten normal_fill) works in blocks of this many
CHUNK_BYTES = 256 * 1024  # at most this much noise drawn ahead per image


class NoiseStream:
    """The normal draws of one image: position 0 is x_T, position i + 1 is step i's z.
    Positions are read in order; a position may be read again (a retried step gets its z again)."""

    __slots__ = ("generator", "shape", "length", "chunk", "rows", "first")

    def __init__(self, seed: int, index: int, shape: tuple[int, ...], length: int):
        """length: how many positions the image will read (1 + steps if its sampler adds noise, else 1)."""
        self.generator = image_generator(seed, index)
        self.shape = shape
        self.length = length
        image_numel = torch.Size(shape).numel()
        aligned = image_numel % NORMAL_FILL_BLOCK == 0
        self.chunk = max(1, CHUNK_BYTES // (4 * image_numel)) if aligned else 1
        self.rows: Sequence[torch.Tensor] = ()  # positions first .. first + len(rows) - 1
        self.first = 0

    def __getitem__(self, position: int) -> torch.Tensor:
        while position >= self.first + len(self.rows):
            self._draw_from(self.first + len(self.rows))
        if position < self.first:
            raise IndexError(f"position {position} was dropped (the stream is at {self.first})")
        return self.rows[position - self.first]

    def _draw_from(self, first: int) -> None:
        count = min(self.chunk, self.length - first)
        if count <= 0:
            raise IndexError(f"the stream holds {self.length} positions")
        self.rows = torch.randn((count, *self.shape), generator=self.generator).unbind(0)
        self.first = first


def stack_to(rows: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.stack(rows) of CPU tensors, on `device`. On CUDA it is stacked into pinned memory and
    copied without blocking, so the host queues the step without waiting for the device."""
    if device.type != "cuda":
        return torch.stack(rows)
    pinned = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, pin_memory=True)
    return torch.stack(rows, out=pinned).to(device, non_blocking=True)


def tensor_to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values) on `device`, through pinned memory on CUDA as stack_to."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
