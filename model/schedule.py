"""Noise schedules: beta_t and every table derived from it, in float64.

Notation follows Ho et al. 2020: alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s,
abar_prev_t = abar_{t-1} with abar_{-1} = 1. Index t runs 0..T-1 (the paper's 1..T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import DiffusionConfig


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    betas: torch.Tensor  # [T] float64

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "NoiseSchedule":
        if config.schedule == "linear":
            return cls(linear_betas(config.num_timesteps, config.beta_start, config.beta_end))
        return cls(cosine_betas(config.num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)  (eq. 7)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        # beta_tilde_0 = 0; reuse beta_tilde_1 there so the log stays finite.
        var = self.posterior_variance
        return torch.log(torch.cat([var[1:2], var[1:]]))

    @property
    def posterior_mean_coef1(self) -> torch.Tensor:
        """Weight of x0 in the posterior mean mu_tilde(x_t, x0)  (eq. 7)."""
        return self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> torch.Tensor:
        """Weight of x_t in the posterior mean."""
        return (1.0 - self.alphas_cumprod_prev) * torch.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

    def model_log_variance(self, variance_type: str) -> torch.Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t) for the paper's two fixed choices."""
        if variance_type == "fixedsmall":
            return self.posterior_log_variance_clipped
        # fixedlarge: sigma_t^2 = beta_t, with beta_tilde_1 at t=0 (no noise is added there anyway).
        return torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
