"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), with Improved-DDPM respacing.

With steps == T this is the paper's sampler. With fewer steps it visits a subset of timesteps
and recomputes beta_i = 1 - abar_{s_i} / abar_{s_{i-1}} (Nichol & Dhariwal 2021, sec. 4),
which matches diffusers' DDPMScheduler.set_timesteps with 'leading' spacing.
"""

from __future__ import annotations

import torch

from ..diffusion import GaussianDiffusion
from .base import SamplingPlan, Slot, alphas_cumprod_pairs, build_plan, spaced_timesteps, x0_coefs


spacing = spaced_timesteps  # the timesteps it visits for a number of steps


def plan(diffusion: GaussianDiffusion, timesteps: torch.Tensor, eta: float = 0.0) -> SamplingPlan:
    """The plan over `timesteps` (descending; the last step goes to x_0)."""
    del eta  # accepted for a uniform sampler signature; ancestral sampling has no eta
    abar_t, abar_prev = alphas_cumprod_pairs(diffusion.schedule.alphas_cumprod, timesteps)
    beta = 1.0 - abar_t / abar_prev
    # Posterior q(x_{t-1} | x_t, x0) of the respaced chain  (eq. 7).
    prev_from_x0 = beta * torch.sqrt(abar_prev) / (1.0 - abar_t)
    prev_from_xt = (1.0 - abar_prev) * torch.sqrt(1.0 - beta) / (1.0 - abar_t)
    if diffusion.config.variance_type == "fixedsmall":
        variance = (beta * (1.0 - abar_prev) / (1.0 - abar_t)).clamp(min=1e-20)
    else:
        variance = beta
    sigma = torch.sqrt(variance)
    sigma[-1] = 0.0  # no noise on the final step (t = 0 in Algorithm 2)
    return build_plan(timesteps, x0_coefs(abar_t), diffusion.config.clip_x0, {  # x0_hat: eq. 15
        Slot.X0: prev_from_x0,  # the posterior mean mu~(x_t, x0_hat)  (eq. 7)
        Slot.X_T: prev_from_xt,
        Slot.NOISE: sigma,  # sigma_t z  (Algorithm 2, line 4)
    })
