"""Samplers, one per file. `make_plan` picks one by name."""

from __future__ import annotations

from typing import Literal

from ..diffusion import GaussianDiffusion
from . import ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, unipc
from .base import (
    CARRIED,
    REACHES_X0,
    SamplingPlan,
    Slot,
    StepOutput,
    denoise_step,
    derived_seed,
    image_generator,
    image_seed,
    next_carried,
    spaced_timesteps,
)
from .noise import NoiseStream, stack_to, tensor_to
from .repaint import renoise_coefs, resample, resampling_rows

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
# Each module has `spacing(T, steps)`, the timesteps it visits, and `plan(diffusion, timesteps, eta)`.
SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde, "unipc": unipc}


def make_plan(diffusion: GaussianDiffusion, sampler: str, steps: int, eta: float = 0.0, start: int = 0) -> SamplingPlan:
    """The plan of `steps` steps. start > 0: of a chain that begins at the start-th of those
    timesteps, from an image encoded there: the same steps from there on, except that a multistep
    solver has no history at its first step and takes it at first order (as diffusers' schedulers
    do after set_begin_index); samplers without history give exactly the full plan's rows."""
    try:
        sampler_module = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}") from None
    timesteps = sampler_module.spacing(diffusion.num_timesteps, steps)
    if not 0 <= start < steps:
        raise ValueError(f"start must be a step of the plan, 0..{steps - 1}, got {start}")
    return sampler_module.plan(diffusion, timesteps[start:], eta)


__all__ = [
    "CARRIED",
    "REACHES_X0",
    "NoiseStream",
    "SAMPLERS",
    "SamplerName",
    "SamplingPlan",
    "Slot",
    "StepOutput",
    "denoise_step",
    "derived_seed",
    "image_generator",
    "image_seed",
    "make_plan",
    "next_carried",
    "renoise_coefs",
    "resample",
    "resampling_rows",
    "spaced_timesteps",
    "stack_to",
    "tensor_to",
]
