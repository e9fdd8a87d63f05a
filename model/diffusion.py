"""The forward process, the simple loss and the variational bound (Ho et al. 2020, sec. 2-3).

Tables live in float64 (NoiseSchedule); `extract` gathers one row per sample, so every
function here takes a timestep per sample: t is a LongTensor [B]. GaussianDiffusion keeps a copy
of each table per (device, dtype), made on first use: a step copies nothing to the device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .config import DiffusionConfig
from .schedule import NoiseSchedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] as [B, 1, 1, 1] in the dtype of `like`, on t's device (a table elsewhere is
    copied there: keep tables on the device, as GaussianDiffusion does, where it matters)."""
    values = table.to(t.device)[t].to(like.dtype)
    return values.view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """Diffusion math for one schedule. Holds only constant tables, never per-request state."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.schedule = NoiseSchedule.from_config(config)
        s = self.schedule
        self.num_timesteps = s.num_timesteps
        self.sqrt_alphas_cumprod = torch.sqrt(s.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - s.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(self.one_minus_alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / s.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / s.alphas_cumprod - 1.0)
        self.posterior_mean_coef1 = s.posterior_mean_coef1
        self.posterior_mean_coef2 = s.posterior_mean_coef2
        self.posterior_variance = s.posterior_variance
        self.posterior_log_variance = s.posterior_log_variance_clipped
        self.model_log_variance = s.model_log_variance(config.variance_type)
        self._table_copies: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def _gather(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """extract() from the float64 table named `table`, through its copy on t's device in
        like's dtype, made once: a copy per call cost a host-to-device copy from pageable
        memory, which the host waits for, per gather (and MPS cannot hold float64 at all)."""
        key = (table, t.device, like.dtype)
        copy = self._table_copies.get(key)
        if copy is None:
            copy = self._table_copies[key] = getattr(self, table).to(like.dtype).to(t.device)
        return extract(copy, t, like)

    # -- forward process ---------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (eq. 4)."""
        return (self._gather("sqrt_alphas_cumprod", t, x0) * x0
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and log-variance of q(x_{t-1} | x_t, x0)  (eqs. 6-7)."""
        mean = self._gather("posterior_mean_coef1", t, x_t) * x0 + self._gather("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._gather("posterior_log_variance", t, x_t)

    def p_mean_variance(self, model: EpsModel, x_t: torch.Tensor, t: torch.Tensor, clip: bool = True):
        """Mean and log-variance of p_theta(x_{t-1} | x_t), via the predicted x0."""
        x0 = self.predict_x0(x_t, t, model(x_t, t))
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, self._gather("model_log_variance", t, x_t)

    # -- training -----------------------------------------------------------------------
    def training_loss(
        self, model: EpsModel, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L_simple: E_{t, eps} ||eps - eps_theta(x_t, t)||^2, t ~ U{0..T-1}  (eq. 14)."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t), noise)

    # -- variational bound --------------------------------------------------------------
    def vlb_terms(self, model: EpsModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_{t-1} in bits/dim per sample: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t>0, -log p(x0|x1) at t=0."""
        x_t = self.q_sample(x0, t, noise)
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        mean, logvar = self.p_mean_variance(model, x_t, t, clip=False)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T: KL(q(x_T | x0) || N(0, I)) in bits/dim per sample."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean = self._gather("sqrt_alphas_cumprod", t, x0) * x0
        logvar = torch.log(self._gather("one_minus_alphas_cumprod", t, x0))
        zeros = torch.zeros_like(x0)
        return mean_flat(normal_kl(mean, logvar, zeros, zeros)) / math.log(2.0)

    @torch.no_grad()
    def bits_per_dim(self, model: EpsModel, x0: torch.Tensor, generators: list[torch.Generator], t_chunk: int = 1):
        """The full bound L_T + sum_t L_{t-1} in bits/dim per sample, and the per-t terms [B, T]
        (column 0: the decoder L_0).

        Each model call covers t_chunk timesteps of the whole batch. Image i draws the noise of
        t = 0, 1, ... in order from generators[i], so the result does not depend on the batch
        size or the chunking."""
        num_images, num_timesteps = x0.shape[0], self.num_timesteps
        terms = []
        for start in range(0, num_timesteps, t_chunk):
            t = torch.arange(start, min(start + t_chunk, num_timesteps), device=x0.device)
            noise = torch.stack([draw_noise(generators, x0.shape[1:], x0.device) for _ in t])  # [K, B, C, H, W]
            # Rows t-major: (t0, image 0..B-1), (t1, image 0..B-1), ...
            chunk = self.vlb_terms(model, x0.repeat(len(t), 1, 1, 1), t.repeat_interleave(num_images), noise.flatten(0, 1))
            terms.append(chunk.view(len(t), num_images))
        terms = torch.cat(terms).T
        return terms.sum(dim=1) + self.prior_bpd(x0), terms


def draw_noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """One standard normal draw of `shape` per generator: [len(generators), *shape]."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation used by the paper's code, kept so bits/dim compare with it.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) for data on 256 levels in [-1, 1], bins of width 2/255, edge bins open-ended."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
