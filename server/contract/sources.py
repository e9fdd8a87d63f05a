"""Image-to-image requests: where a request's lanes start, as plain data (no torch).

The paper does more with a trained model than sample from noise (Ho et al. 2020, sec. 4.3):
encode an image to x_t with q(x_t | x_0) and run the reverse process from there. Every
operation below is that, with a different start per image:

- Variation (SDEdit, Meng et al. 2022): the image encoded at t0 = strength x T.
- Inpainting: sampling from noise, but after every step the known pixels are replaced
  by the input encoded to that step (the replacement method), optionally with RePaint's
  resampling (Lugmayr et al. 2022): every jump_length steps the sample is noised back up
  jump_length steps and that stretch denoised again, jump_n_sample times in all, which
  multiplies the U-Net calls (resampled_steps).
- Interpolation (paper Fig. 8): two images encoded with the same noise and mixed,
  (1 - lambda) x_t + lambda x'_t. With one noise that *is* the encoding of the mixed image
  (1 - lambda) x_0 + lambda x'_0, so each lambda is one reconstruction.
- Reconstruction (paper Fig. 7): the image encoded at each t, then denoised.

Images arrive already converted to the model's channels and size (the API's job), as uint8
bytes in channel-major order.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal, get_args

Operation = Literal["variation", "inpaint", "interpolate", "reconstruct"]
OPERATIONS: tuple[str, ...] = get_args(Operation)
# Samplers whose step depends only on its own timestep and the next one, so a plan may jump back
# up (RePaint). A multistep solver's history would belong to the stretch it left. (A lane starting
# from an image later in the plan works with every sampler: a multistep one starts at first order.)
RESAMPLING_SAMPLERS = ("ddpm", "ddim")
MAX_RESAMPLING = 10  # a resampled plan takes at most this many times T U-Net calls per image
DEFAULT_JUMP_LENGTH = 10  # RePaint's and diffusers' j
DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength
DEFAULT_INTERPOLATION_T = 500  # the paper's Fig. 8


@dataclass(frozen=True)
class Picture:
    """An image at the model's size: uint8 pixels, channel-major (C, H, W)."""

    pixels: bytes
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        c, h, w = self.shape
        if len(self.pixels) != c * h * w:
            raise ValueError(f"a {c}x{h}x{w} picture needs {c * h * w} bytes, got {len(self.pixels)}")


@dataclass(frozen=True)
class Source:
    """What an image-to-image request starts from (GenerationSpec.source; None: pure noise).

    keep: for inpainting, one byte per pixel (H x W), 1 where the input is kept and 0 where it
    is generated. t values are the paper's 1..T (t = 500 encodes with abar at index 499).
    """

    operation: Operation
    image: Picture
    strength: float = DEFAULT_STRENGTH  # variation
    keep: bytes | None = None  # inpaint
    other: Picture | None = None  # interpolate: the second image
    lambdas: tuple[float, ...] = ()  # interpolate: one image per lambda
    t: int = DEFAULT_INTERPOLATION_T  # interpolate
    timesteps: tuple[int, ...] = ()  # reconstruct: one image per t
    jump_length: int = DEFAULT_JUMP_LENGTH  # inpaint: RePaint's j
    jump_n_sample: int = 1  # inpaint: RePaint's r (1: no resampling)

    @property
    def image_count(self) -> int | None:
        """Images the operation itself fixes (None: the request's n)."""
        if self.operation == "interpolate":
            return len(self.lambdas)
        if self.operation == "reconstruct":
            return len(self.timesteps)
        return None

    @property
    def one_noise(self) -> bool:
        """Interpolations and reconstructions use the request seed for every image, so the
        images of one request differ only by lambda or t."""
        return self.operation in ("interpolate", "reconstruct")


def resampled_steps(steps: int, jump_length: int, jump_n_sample: int) -> int:
    """U-Net calls per image of a `steps`-step plan with RePaint's resampling: a jump back up
    jump_length steps at every jump point (model.samplers.resampling_rows visits them), each
    jump_n_sample - 1 times."""
    jump_points = len(range(0, steps - jump_length, jump_length))
    return steps + (jump_n_sample - 1) * jump_length * jump_points


def source_to_json(source: Source) -> dict:
    """A JSON-able dict (the job store keeps requests as JSON); source_from_json inverts it."""
    data = {field: getattr(source, field) for field in ("operation", "strength", "t", "jump_length", "jump_n_sample")}
    data.update(lambdas=list(source.lambdas), timesteps=list(source.timesteps),
                image=picture_to_json(source.image), other=source.other and picture_to_json(source.other),
                keep=source.keep and base64.b64encode(source.keep).decode())
    return data


def source_from_json(data: dict) -> Source:
    return Source(operation=data["operation"], image=picture_from_json(data["image"]), strength=data["strength"],
                  keep=data["keep"] and base64.b64decode(data["keep"]),
                  other=data["other"] and picture_from_json(data["other"]), lambdas=tuple(data["lambdas"]),
                  t=data["t"], timesteps=tuple(data["timesteps"]),
                  jump_length=data.get("jump_length", DEFAULT_JUMP_LENGTH), jump_n_sample=data.get("jump_n_sample", 1))


def picture_to_json(picture: Picture) -> dict:
    return {"pixels": base64.b64encode(picture.pixels).decode(), "shape": list(picture.shape)}


def picture_from_json(data: dict) -> Picture:
    return Picture(base64.b64decode(data["pixels"]), tuple(data["shape"]))
