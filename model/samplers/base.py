"""What every sampler shares: a per-request plan of coefficients, and one batched step.

A sampler is a function that turns (schedule, number of steps, options) into a
SamplingPlan: the model timesteps to visit and, for each, the coefficients of

    x0_hat = clip(a * x_t - b * eps_hat)
    x_prev = c * x0_hat + d * x_t + e * eps_hat + sigma * z

(the columns of Coef, a to sigma in order).

Ancestral DDPM and DDIM are both of this form. `denoise_step` applies it to a batch whose
rows may come from different plans and sit at different steps: each row brings its own
coefficients, so batching never changes one image's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch


class Coef(IntEnum):
    """The columns of SamplingPlan.coefs: what each coefficient multiplies, and its source.
    DDPM: Ho et al. 2020; DDIM: Song et al. 2021. abar_prev is abar at the next visited t."""

    # x0_hat = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps_hat  (DDPM eq. 15; DDIM eq. 12)
    X0_FROM_XT = 0
    X0_FROM_EPS = 1
    # Posterior mean, mu~ = c1 x0_hat + c2 x_t  (DDPM eq. 7); DDIM: sqrt(abar_prev) x0_hat, no x_t
    PREV_FROM_X0 = 2
    PREV_FROM_XT = 3
    # DDIM's "direction pointing to x_t", sqrt(1 - abar_prev - sigma^2) eps_hat (eq. 12); DDPM: 0
    PREV_FROM_EPS = 4
    # Scale of the fresh noise z: DDPM sigma_t (Algorithm 2, line 4; 0 at the last step);
    # DDIM sigma_t(eta)  (eq. 16)
    SIGMA = 5


def stack_coefs(columns: dict[Coef, torch.Tensor]) -> torch.Tensor:
    """[N, len(Coef)] from one [N] tensor per column."""
    if set(columns) != set(Coef):
        raise ValueError(f"need every column of Coef, got {sorted(c.name for c in columns)}")
    return torch.stack([columns[c] for c in Coef], dim=1)


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: torch.Tensor  # [N] long, descending: the t given to the model at step i
    coefs: torch.Tensor  # [N, 6] float64, columns as Coef
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
    """Columns X0_FROM_XT and X0_FROM_EPS (Ho et al. 2020, eq. 15)."""
    return torch.sqrt(1.0 / abar_t), torch.sqrt(1.0 / abar_t - 1.0)


def denoise_step(
    x_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, clip: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step for a batch. coefs: [B, 6] (rows of plans); clip: [B] bool; noise: like x_t.

    Returns (x_prev, x0_hat)."""
    c = coefs.to(device=x_t.device, dtype=x_t.dtype)[:, :, None, None, None]  # c[:, Coef.X]: [B, 1, 1, 1]
    x0 = c[:, Coef.X0_FROM_XT] * x_t - c[:, Coef.X0_FROM_EPS] * eps
    bound = torch.where(clip.to(x_t.device), 1.0, float("inf")).to(x_t.dtype)[:, None, None, None]
    x0 = torch.maximum(torch.minimum(x0, bound), -bound)
    x_prev = (c[:, Coef.PREV_FROM_X0] * x0 + c[:, Coef.PREV_FROM_XT] * x_t + c[:, Coef.PREV_FROM_EPS] * eps
              + c[:, Coef.SIGMA] * noise)
    return x_prev, x0


def derived_seed(seed: int, key: int) -> int:
    """A seed in [0, 2**63) for stream `key` of `seed`: independent of every other (seed, key)."""
    return int(np.random.SeedSequence([seed, key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request: the request seed itself for image 0, a derived,
    independent one for the others. So the seed reported for image i, given as the seed of a
    one-image request, gives image i again: sample(1, seed=image_seed(s, i)) == sample(n, seed=s)[i]."""
    return seed if index == 0 else derived_seed(seed, index)


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(image_seed(seed, index))
