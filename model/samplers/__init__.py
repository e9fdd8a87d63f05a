"""Samplers, one per file. `make_plan` picks one by name."""

from __future__ import annotations

from typing import Literal

from ..diffusion import GaussianDiffusion
from . import ddim, ddpm
from .base import SamplingPlan, denoise_step, derived_seed, image_generator, image_seed, spaced_timesteps

SamplerName = Literal["ddpm", "ddim"]
SAMPLERS = {"ddpm": ddpm.plan, "ddim": ddim.plan}


def make_plan(diffusion: GaussianDiffusion, sampler: str, steps: int, eta: float = 0.0) -> SamplingPlan:
    try:
        build = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}") from None
    return build(diffusion, steps, eta)


__all__ = [
    "SAMPLERS",
    "SamplerName",
    "SamplingPlan",
    "denoise_step",
    "derived_seed",
    "image_generator",
    "image_seed",
    "make_plan",
    "spaced_timesteps",
]
