"""Samplers, one per file. `make_plan` picks one by name."""

from __future__ import annotations

from typing import Literal

from ..diffusion import GaussianDiffusion
from . import ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, unipc
from .base import (
    CARRIED,
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

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
SAMPLERS = {"ddpm": ddpm.plan, "ddim": ddim.plan, "dpmpp_2m": dpmpp_2m.plan, "dpmpp_2m_sde": dpmpp_2m_sde.plan,
            "unipc": unipc.plan}


def make_plan(diffusion: GaussianDiffusion, sampler: str, steps: int, eta: float = 0.0) -> SamplingPlan:
    try:
        build = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}") from None
    return build(diffusion, steps, eta)


__all__ = [
    "CARRIED",
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
    "spaced_timesteps",
    "stack_to",
    "tensor_to",
]
