"""SDE-DPM-Solver++(2M): DPM-Solver++(2M) for the reverse diffusion SDE (Lu et al. 2022,
"DPM-Solver++"; diffusers' algorithm_type "sde-dpmsolver++", midpoint, order 2). It takes the
steps, the history and the lower-order first and last steps of dpmpp_2m, but solves the SDE, so
every step adds fresh noise z from the lane's own generator:

    x_{i+1} = (sigma_{i+1} / sigma_i) e^{-h_i} x_i + alpha_{i+1} (1 - e^{-2 h_i}) D_i
              + sigma_{i+1} sqrt(1 - e^{-2 h_i}) z

with D_i as in dpmpp_2m. The last step lands on sigma = 0 and adds no noise. x0_hat is clipped as
in dpmpp_2m.
"""

from __future__ import annotations

import torch

from ..diffusion import GaussianDiffusion
from .base import LogSnrGrid, SamplingPlan, Slot, build_plan, linspace_timesteps, x0_coefs
from .dpmpp_2m import second_order_weight


spacing = linspace_timesteps  # the timesteps it visits for a number of steps


def plan(diffusion: GaussianDiffusion, timesteps: torch.Tensor, eta: float = 0.0) -> SamplingPlan:
    """The plan over `timesteps` (descending; the last step goes to x_0)."""
    del eta  # DDIM's option only
    alphas_cumprod = diffusion.schedule.alphas_cumprod
    grid = LogSnrGrid.of(alphas_cumprod, timesteps)
    fresh = -torch.expm1(-2.0 * grid.h)  # 1 - e^{-2 h_i}: the share of sigma_{i+1}^2 that is new noise
    integral = grid.alpha[1:] * fresh  # alpha_{i+1} (1 - e^{-2 h_i})
    weight = second_order_weight(grid)
    return build_plan(timesteps, x0_coefs(alphas_cumprod[timesteps]), diffusion.config.clip_x0, {
        Slot.X_T: grid.sigma_ratio * torch.exp(-grid.h),  # (sigma_{i+1} / sigma_i) e^{-h_i}
        Slot.X0: integral * (1.0 + weight),  # D_i's x0_hat_i term
        Slot.PREV_X0: -integral * weight,  # D_i's x0_hat_{i-1} term
        Slot.NOISE: grid.sigma[1:] * torch.sqrt(fresh),  # sigma_{i+1} sqrt(1 - e^{-2 h_i})
    })
