"""DDIM sampling (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM-like at eta = 1."""

from __future__ import annotations

import torch

from ..diffusion import GaussianDiffusion
from .base import SamplingPlan, Slot, alphas_cumprod_pairs, build_plan, spaced_timesteps, x0_coefs


spacing = spaced_timesteps  # the timesteps it visits for a number of steps


def plan(diffusion: GaussianDiffusion, timesteps: torch.Tensor, eta: float = 0.0) -> SamplingPlan:
    """The plan over `timesteps` (descending; the last step goes to x_0)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    abar_t, abar_prev = alphas_cumprod_pairs(diffusion.schedule.alphas_cumprod, timesteps)
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    direction = torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0))
    return build_plan(timesteps, x0_coefs(abar_t), diffusion.config.clip_x0, {  # eq. 12's "predicted x0"
        Slot.X0: torch.sqrt(abar_prev),  # eq. 12
        Slot.EPS: direction,  # eq. 12's "direction pointing to x_t"
        Slot.NOISE: sigma,  # eq. 16
    })
