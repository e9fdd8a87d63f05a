"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the second-order multistep
solver of the diffusion ODE in data prediction, as diffusers' DPMSolverMultistepScheduler runs it
(algorithm_type "dpmsolver++", solver_order 2, midpoint, lower_order_final, final sigma 0,
its default 'linspace' timesteps).

Step i goes from t_i to t_{i+1} (the last one to sigma = 0), h_i = lam_{i+1} - lam_i:

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i

with D_i = x0_hat_i (first order: DPM-Solver++1, the DDIM step) on the first step, which has no
history, and on the last, which lands on sigma = 0 (diffusers' lower-order final step), and
elsewhere D_i = (1 + 1/(2 r_i)) x0_hat_i - 1/(2 r_i) x0_hat_{i-1}, r_i = h_{i-1} / h_i.

x0_hat is clipped to [-1, 1] when the model's config clips, as for DDPM and DDIM: thresholding
the data prediction, which DPM-Solver++ names as a reason to solve in data prediction, in its
static form (diffusers offers only the dynamic one). The history holds the clipped predictions.
Where no prediction leaves [-1, 1] the two agree (tests/model/test_samplers_multistep.py).
"""

from __future__ import annotations

import torch

from ..diffusion import GaussianDiffusion
from .base import LogSnrGrid, SamplingPlan, Slot, build_plan, linspace_timesteps, x0_coefs


spacing = linspace_timesteps  # the timesteps it visits for a number of steps


def plan(diffusion: GaussianDiffusion, timesteps: torch.Tensor, eta: float = 0.0) -> SamplingPlan:
    """The plan over `timesteps` (descending; the last step goes to x_0)."""
    del eta  # DDIM's option only
    alphas_cumprod = diffusion.schedule.alphas_cumprod
    grid = LogSnrGrid.of(alphas_cumprod, timesteps)
    integral = grid.alpha[1:] * torch.expm1(-grid.h)  # alpha_{i+1} (e^{-h_i} - 1)
    weight = second_order_weight(grid)
    return build_plan(timesteps, x0_coefs(alphas_cumprod[timesteps]), diffusion.config.clip_x0, {
        Slot.X_T: grid.sigma_ratio,  # sigma_{i+1} / sigma_i
        Slot.X0: -integral * (1.0 + weight),  # D_i's x0_hat_i term
        Slot.PREV_X0: integral * weight,  # D_i's x0_hat_{i-1} term
    })


def second_order_weight(grid: LogSnrGrid) -> torch.Tensor:
    """[N]: 1 / (2 r_i) = h_i / (2 h_{i-1}) on second-order steps, 0 on the first-order first
    and last steps (Algorithm 2's D_i; diffusers' midpoint D1 = (x0_hat_i - x0_hat_{i-1}) / r_i
    with weight 1/2)."""
    h = grid.h
    weight = torch.zeros_like(h)
    weight[1:-1] = h[1:-1] / (2.0 * h[:-2])
    return weight
