"""Image-to-image lanes (server.contract.sources) in tensors: where each lane starts, and the
known pixels an inpainting lane keeps.

A lane that starts from an image starts at the first visited timestep below t0, from the image
encoded there with q(x_t | x_0) (Ho et al. 2020, eq. 4), the lane's first normal draw as the
noise: the draw that is x_T for a lane from noise. A start at the plan's first step is that
plain x_T, the paper's prior, so a variation at strength 1 is the plain image of its seed.

An inpainting lane runs the whole chain from noise; after every step its known pixels are
replaced by the input encoded to the step reached (the input itself after the last one). That
noise comes from a stream of its own, so the lane's own draws are those of plain sampling. With
RePaint's resampling its plan jumps back up now and then (model.samplers.repaint): after the
replacement the whole sample is noised up, with draws from a third stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.diffusion import GaussianDiffusion
from model.samplers import NoiseStream, derived_seed

from server.contract.sources import Picture, Source

KNOWN_NOISE_KEY = 1  # derived_seed(lane seed, this): the known region's noise stream
JUMP_NOISE_KEY = 2  # derived_seed(lane seed, this): the noise of RePaint's jumps


@dataclass(frozen=True)
class LaneStart:
    image: torch.Tensor | None = None  # x_0 in [-1, 1], (C, H, W) on the CPU; None: from noise
    cursor: int = 0  # the plan step it starts at
    keep: torch.Tensor | None = None  # inpainting: (1, H, W) bool, True where the input is kept


def lane_starts(source: Source | None, n: int, timesteps: list[int], num_timesteps: int) -> list[LaneStart]:
    """One start per image of a request whose plan visits `timesteps`."""
    if source is None:
        return [LaneStart()] * n
    image = picture_tensor(source.image)
    if source.operation == "variation":
        return [LaneStart(image, start_cursor(timesteps, source.strength * num_timesteps))] * n
    if source.operation == "inpaint":
        keep = torch.frombuffer(bytearray(source.keep), dtype=torch.uint8).view(1, *image.shape[1:]).bool()
        return [LaneStart(image, keep=keep)] * n
    if source.operation == "interpolate":
        # Both encoded with the lane's one noise and mixed: the encoding of the mixed image.
        other = picture_tensor(source.other)
        mixed = [torch.lerp(image, other, weight) for weight in source.lambdas]
        return [LaneStart(picture, start_cursor(timesteps, source.t)) for picture in mixed]
    return [LaneStart(image, start_cursor(timesteps, t)) for t in source.timesteps]


def resampling(source: Source | None) -> tuple[int, int] | None:
    """(jump_length, jump_n_sample) where a request asks for RePaint's resampling."""
    if source is None or source.operation != "inpaint" or source.jump_n_sample == 1:
        return None
    return source.jump_length, source.jump_n_sample


def picture_tensor(picture: Picture) -> torch.Tensor:
    """uint8 pixels to the model's range [-1, 1] (model.data.to_model_range's rule)."""
    pixels = torch.frombuffer(bytearray(picture.pixels), dtype=torch.uint8).view(picture.shape)
    return pixels.float() / 127.5 - 1.0


def start_cursor(timesteps: list[int], t0: float) -> int:
    """The first step of a descending plan whose timestep index lies below t0 (paper t = index + 1)."""
    return next(k for k, t in enumerate(timesteps) if t < t0 or k == len(timesteps) - 1)


class KnownRegion:
    """An inpainting lane's input and mask, its noise for encoding the input at each step, and
    the noise of its plan's jumps."""

    __slots__ = ("image", "keep", "noise", "jump_noise")

    def __init__(self, start: LaneStart, lane_seed: int, steps: int, jumps: int):
        self.image, self.keep = start.image, start.keep
        shape = tuple(start.image.shape)
        self.noise = NoiseStream(derived_seed(lane_seed, KNOWN_NOISE_KEY), 0, shape, steps)
        self.jump_noise = NoiseStream(derived_seed(lane_seed, JUMP_NOISE_KEY), 0, shape, jumps) if jumps else None


def encode(diffusion: GaussianDiffusion, image: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) for one image (eq. 4, the model's own q_sample)."""
    return diffusion.q_sample(image[None], torch.tensor([t]), noise[None])[0]
