"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the predictor UniP and corrector UniC of order 2 in data prediction with
B(h) = e^h - 1 ("bh2"), as diffusers' UniPCMultistepScheduler runs them by default (solver_order
2, lower_order_final, final sigma 0, its 'linspace' timesteps, the corrector after every step).

Let m_i be x0_hat at the U-Net's input x_i, and h_i = lam_{i+1} - lam_i. Step i first corrects
the sample the previous step started from (UniC; step 0 starts from x^c_0 = x_T):

    x^c_i = (sigma_i / sigma_{i-1}) x^c_{i-1} - alpha_i (e^{-h} - 1) m_{i-1}
            - alpha_i B(-h) (rho^c_1 (m_{i-2} - m_{i-1}) / r + rho^c_2 (m_i - m_{i-1})),   h = h_{i-1}

then predicts the next sample from the corrected one (UniP):

    x_{i+1} = (sigma_{i+1} / sigma_i) x^c_i - alpha_{i+1} (e^{-h_i} - 1) m_i
              - alpha_{i+1} B(-h_i) rho^p (m_{i-1} - m_i) / r_i

with r_i = (lam_{i-1} - lam_i) / h_i. The predictor is of order 1 (no r term) on the first step,
which has no history, and on the last, which lands on sigma = 0; of order 2 elsewhere, with
rho^p = 1/2. The corrector has the order of the prediction it corrects: at order 1 rho^c_2 = 1/2
(and no rho^c_1 term); at order 2 (rho^c_1, rho^c_2) solves the paper's R rho = b, R = [[1, 1],
[r, 1]], b_k = k! (-h) phi_{k+1}(-h) / B(-h), with r and h those of that prediction.

A lane carries m_{i-1}, m_{i-2} and x^c_{i-1}; x^c_i is the plan's corrected output and x_{i+1}
its next sample, each a linear combination of those, m_i and x_i. x0_hat is clipped as in
dpmpp_2m.
"""

from __future__ import annotations

import torch

from ..diffusion import GaussianDiffusion
from .base import LogSnrGrid, SamplingPlan, Slot, Weights, build_plan, linspace_timesteps, x0_coefs


spacing = linspace_timesteps  # the timesteps it visits for a number of steps


def plan(diffusion: GaussianDiffusion, timesteps: torch.Tensor, eta: float = 0.0) -> SamplingPlan:
    """The plan over `timesteps` (descending; the last step goes to x_0)."""
    del eta  # DDIM's option only
    alphas_cumprod = diffusion.schedule.alphas_cumprod
    grid = LogSnrGrid.of(alphas_cumprod, timesteps)
    corrected = corrector_weights(grid)
    predictor = predictor_weights(grid)
    start = predictor.pop(Slot.CORRECTED)  # the predictor starts from x^c_i: substitute the corrector
    following = {slot: start * weight for slot, weight in corrected.items()}
    for slot, weight in predictor.items():
        following[slot] = following.get(slot, 0.0) + weight
    return build_plan(timesteps, x0_coefs(alphas_cumprod[timesteps]), diffusion.config.clip_x0,
                      following, corrected)


def predictor_orders(steps: int) -> torch.Tensor:
    """[N]: UniP's order at each step: 1 on the first and last, 2 between."""
    orders = torch.full((steps,), 2)
    orders[0] = orders[-1] = 1
    return orders


def log_snr_ratios(grid: LogSnrGrid) -> torch.Tensor:
    """[N]: r_i = (lam_{i-1} - lam_i) / h_i (nan at i = 0, which has no previous step)."""
    before = torch.cat([torch.full((1,), float("nan"), dtype=torch.float64), grid.lam[:-2]])
    return (before - grid.lam[:-1]) / grid.h


def predictor_weights(grid: LogSnrGrid) -> Weights:
    """UniP: x_{i+1} over x^c_i (under Slot.CORRECTED here), m_i and m_{i-1}."""
    alpha_next = grid.alpha[1:]
    exp_step = torch.expm1(-grid.h)  # e^{-h_i} - 1, which is also B(-h_i) for bh2
    second_order = predictor_orders(len(grid.h)) == 2
    rho_over_r = torch.where(second_order, 0.5 / log_snr_ratios(grid), 0.0)  # rho^p / r_i
    return {
        Slot.CORRECTED: grid.sigma_ratio,
        Slot.X0: -alpha_next * exp_step + alpha_next * exp_step * rho_over_r,
        Slot.PREV_X0: -alpha_next * exp_step * rho_over_r,
    }


def corrector_weights(grid: LogSnrGrid) -> Weights:
    """UniC: x^c_i over x^c_{i-1}, m_i, m_{i-1}, m_{i-2}; x^c_0 = x_T. Step i corrects the
    prediction of step j = i - 1, with that step's h, r and order."""
    steps = len(grid.h)
    h, r = grid.h[:-1], log_snr_ratios(grid)[:-1]  # of j = 0 .. N-2
    exp_step = torch.expm1(-h)  # e^{-h} - 1 = B(-h)
    rho_near, rho_far = corrector_rhos(h, r, predictor_orders(steps)[:-1])
    alpha = grid.alpha[1:-1]  # alpha_i, i = 1 .. N-1
    far_over_r = torch.where(rho_far != 0, rho_far / r, 0.0)
    weights = {
        Slot.CORRECTED: grid.sigma_ratio[:-1],
        Slot.X0: -alpha * exp_step * rho_near,
        Slot.PREV_X0: -alpha * exp_step + alpha * exp_step * (far_over_r + rho_near),
        Slot.PREV_PREV_X0: -alpha * exp_step * far_over_r,
    }
    first_step = torch.zeros(1, dtype=torch.float64)
    corrected = {slot: torch.cat([first_step, weight]) for slot, weight in weights.items()}
    corrected[Slot.X_T] = torch.cat([torch.ones(1, dtype=torch.float64), torch.zeros(steps - 1, dtype=torch.float64)])
    return corrected


def corrector_rhos(h: torch.Tensor, r: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho^c on m_i - m_{i-1}, rho^c on the r-scaled m_{i-2} - m_{i-1}) per corrected step.
    Order 1: (1/2, 0), diffusers' simplified choice. Order 2: R rho = b with R = [[1, 1], [r, 1]],
    b_k = k! (-h) phi_{k+1}(-h) / B(-h): phi_2 and phi_3 by phi_{k+1}(z) = (phi_k(z) - 1/k!) / z."""
    z = -h
    b_of_h = torch.expm1(z)  # B(z) = e^z - 1, bh2
    z_phi_2 = b_of_h / z - 1.0  # z phi_2(z), as phi_1(z) = (e^z - 1) / z
    z_phi_3 = z_phi_2 / z - 0.5  # z phi_3(z)
    b = torch.stack([z_phi_2 / b_of_h, 2.0 * z_phi_3 / b_of_h], dim=-1)
    second = orders == 2
    R = torch.ones(len(h), 2, 2, dtype=torch.float64)
    R[:, 1, 0] = torch.where(second, r, 0.0)  # any invertible R where order 1 discards the result
    rho = torch.linalg.solve(R, b.unsqueeze(-1)).squeeze(-1)
    rho_near = torch.where(second, rho[:, 1], 0.5)
    rho_far = torch.where(second, rho[:, 0], 0.0)
    return rho_near, rho_far
