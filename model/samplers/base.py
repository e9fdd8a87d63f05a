"""What every sampler shares: a per-request plan of coefficients, and one batched step.

A sampler is a function that turns (schedule, number of steps, options) into a
SamplingPlan: the model timesteps to visit and, for each, the coefficients of

    x0_hat = clip(a * x_t - b * eps_hat)
    x_prev = c * x0_hat + d * x_t + e * eps_hat + sigma * z

Ancestral DDPM and DDIM are both of this form. `denoise_step` applies it to a batch whose
rows may come from different plans and sit at different steps: each row brings its own
coefficients, so batching never changes one image's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COEF_NAMES = ("x0_from_xt", "x0_from_eps", "prev_from_x0", "prev_from_xt", "prev_from_eps", "sigma")


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: torch.Tensor  # [N] long, descending: the t given to the model at step i
    coefs: torch.Tensor  # [N, 6] float64, columns as COEF_NAMES
    clip_x0: bool

    def __len__(self) -> int:
        return self.timesteps.shape[0]


def spaced_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """diffusers' 'leading' spacing: arange(steps) * (T // steps), descending (T=1000, 50 -> 980..0)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    return (torch.arange(steps, dtype=torch.long) * (num_timesteps // steps)).flip(0)


def alphas_cumprod_pairs(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor):
    """abar at each visited t and at the next visited t (1 past the last step)."""
    abar_t = alphas_cumprod[timesteps]
    abar_prev = torch.cat([alphas_cumprod[timesteps[1:]], torch.ones(1, dtype=torch.float64)])
    return abar_t, abar_prev


def x0_coefs(abar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sqrt(1.0 / abar_t), torch.sqrt(1.0 / abar_t - 1.0)


def denoise_step(
    x_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, clip: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step for a batch. coefs: [B, 6] (rows of plans); clip: [B] bool; noise: like x_t.

    Returns (x_prev, x0_hat)."""
    c = coefs.to(device=x_t.device, dtype=x_t.dtype)[:, :, None, None, None].unbind(1)
    x0 = c[0] * x_t - c[1] * eps
    bound = torch.where(clip.to(x_t.device), 1.0, float("inf")).to(x_t.dtype)[:, None, None, None]
    x0 = torch.maximum(torch.minimum(x0, bound), -bound)
    x_prev = c[2] * x0 + c[3] * x_t + c[4] * eps + c[5] * noise
    return x_prev, x0


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request: independent streams, whatever the batch."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(image_seed(seed, index))
