"""RePaint's resampling (Lugmayr et al. 2022, sec. 4.2, Algorithm 1): inpainting that, every
`jump_length` steps, noises the sample back up `jump_length` steps and denoises that stretch
again, `jump_n_sample` times in all, so the generated region can harmonise with the known one.
It multiplies the U-Net calls: steps + (jump_n_sample - 1) x jump_length x (jump points), about
jump_n_sample x steps.

A resampled plan is an ordinary plan with its rows visited in RePaint's order; `reaches` tells
where each step lands, and where the next step starts higher, the sample is first noised up
there with q(x_t | x_s) (renoise_coefs). Only samplers without history can jump: a multistep
solver's history would belong to the stretch it left.
"""

from __future__ import annotations

import math

import torch

from .base import REACHES_X0, SamplingPlan


def resampling_rows(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The rows of a `steps`-step plan in the order RePaint visits them: the order of
    diffusers' RePaintScheduler.set_timesteps, whose level k is row steps - 1 - k here."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length} and {jump_n_sample}")
    jumps_left = {level: jump_n_sample - 1 for level in range(0, steps - jump_length, jump_length)}
    rows, level = [], steps
    while level >= 1:
        level -= 1
        rows.append(steps - 1 - level)
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            level += jump_length
    return rows


def resample(plan: SamplingPlan, jump_length: int, jump_n_sample: int) -> SamplingPlan:
    """`plan` with RePaint's resampling."""
    if plan.carries:
        raise ValueError("RePaint's resampling needs a sampler without history (ddpm or ddim)")
    rows = torch.tensor(resampling_rows(len(plan), jump_length, jump_n_sample))
    return SamplingPlan(plan.timesteps[rows], plan.coefs[rows], plan.reads, plan.corrects, plan.reaches[rows])


def renoise_coefs(alphas_cumprod: torch.Tensor, reached: int, t: int) -> tuple[float, float]:
    """(a, b) with x_t = a x_s + b z ~ q(x_t | x_s) for a sample at timestep s = `reached`
    (REACHES_X0: x_0 itself) noised up to t > s: the forward process over several steps,
    abar_t / abar_s in place of abar_t in Ho et al. 2020, eq. 4."""
    abar_s = 1.0 if reached == REACHES_X0 else float(alphas_cumprod[reached])
    kept = float(alphas_cumprod[t]) / abar_s
    return math.sqrt(kept), math.sqrt(1.0 - kept)
