"""DDIM sampling (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM-like at eta = 1."""

from __future__ import annotations

import torch

from ..diffusion import GaussianDiffusion
from .base import Coef, SamplingPlan, alphas_cumprod_pairs, spaced_timesteps, stack_coefs, x0_coefs


def plan(diffusion: GaussianDiffusion, steps: int, eta: float = 0.0) -> SamplingPlan:
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps = spaced_timesteps(diffusion.num_timesteps, steps)
    abar_t, abar_prev = alphas_cumprod_pairs(diffusion.schedule.alphas_cumprod, timesteps)
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    direction = torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0))
    a, b = x0_coefs(abar_t)
    coefs = stack_coefs({
        Coef.X0_FROM_XT: a,  # eq. 12's "predicted x0"
        Coef.X0_FROM_EPS: b,
        Coef.PREV_FROM_X0: torch.sqrt(abar_prev),  # eq. 12
        Coef.PREV_FROM_XT: torch.zeros_like(a),
        Coef.PREV_FROM_EPS: direction,  # eq. 12's "direction pointing to x_t"
        Coef.SIGMA: sigma,  # eq. 16
    })
    return SamplingPlan(timesteps, coefs, diffusion.config.clip_x0)
