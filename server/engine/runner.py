"""The model's side of the engine: one batched denoising step over lanes of any requests.

Each lane brings its own timestep, its own sampler coefficients and its own noise, so lanes
of different samplers, step counts and positions share one U-Net call:

    t[B], coefs[B, 6], clip[B]  gathered from each lane's plan at its cursor
    eps = unet(x_t[B, C, H, W], t)
    x_prev, x0_hat = denoise_step(x_t, eps, coefs, clip, z)   z[b] from lane b's generator
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from model import DDPM
from model.samplers import denoise_step, make_plan

from .request import Lane, LanePlan

PLAN_CACHE_SIZE = 64  # distinct (sampler, steps, eta); eta is a free float, so bound it


class Runner:
    def __init__(self, ddpm: DDPM):
        ddpm.unet.eval()
        self.ddpm = ddpm
        self.device = ddpm.device
        self.image_shape = ddpm.image_shape
        self._plans: OrderedDict[tuple[str, int, float], LanePlan] = OrderedDict()

    @property
    def num_timesteps(self) -> int:
        return self.ddpm.diffusion.num_timesteps

    def plan(self, sampler: str, steps: int, eta: float) -> LanePlan:
        """The cached plan for these settings (ValueError for settings no sampler accepts).
        Lanes hold their plan, so evicting one never disturbs a running lane."""
        key = (sampler, steps, eta)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        plan = LanePlan.of(make_plan(self.ddpm.diffusion, sampler, steps, eta))
        self._plans[key] = plan
        if len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def step(self, lanes: Sequence[Lane]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One reverse step for every lane; returns (x_prev, x0_hat) per lane.
        Lanes are not advanced (the caller commits), so a failed step can be retried: each
        lane keeps the noise it drew for this step."""
        device = self.device
        t = torch.tensor([lane.t for lane in lanes], dtype=torch.long, device=device)
        coefs = torch.tensor([lane.coefs for lane in lanes], dtype=torch.float64)
        clip = torch.tensor([lane.plan.clip_x0 for lane in lanes])
        x_t = torch.stack([lane.x for lane in lanes])
        noise = torch.stack([lane.step_noise() for lane in lanes])
        eps = self.ddpm.unet(x_t, t)
        x_prev, x0 = denoise_step(x_t, eps, coefs, clip, noise)
        return x_prev.unbind(0), x0.unbind(0)
