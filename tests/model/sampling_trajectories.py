"""Whole sampling trajectories for the sampler tests: ours, from a plan, and diffusers', from a
scheduler, with the same cheap stand-in for the U-Net and the same per-step noise."""

from __future__ import annotations

import torch

import model
from model.samplers import SamplingPlan, Slot, denoise_step, next_carried

SHAPE = (3, 3, 8, 8)  # [B, C, H, W]: small, so T=1000 steps stay cheap
TARGET = torch.linspace(-1.0, 1.0, 8).repeat(3, 8, 1)  # [C, H, W]: a ramp touching both clip bounds


class FakeDenoiser:
    """The eps a model of the one image TARGET would predict, plus an error term that sends
    x0_hat out of [-1, 1], so clipping changes the trajectory."""

    def __init__(self, config: model.DiffusionConfig):
        self.alphas_cumprod = model.GaussianDiffusion(config).schedule.alphas_cumprod.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1, 1, 1, 1)
        abar = self.alphas_cumprod[t]
        exact = (x - abar.sqrt() * TARGET) / (1.0 - abar).sqrt()
        return exact + 0.3 * torch.tanh(x) * torch.cos(t / 300.0)


class BoundedDenoiser(FakeDenoiser):
    """An eps whose x0_hat depends on x_t and t but never leaves (-0.9, 0.9): clipping to
    [-1, 1] changes nothing, so a clipping sampler can be compared with diffusers' unclipped one."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1, 1, 1, 1)
        abar = self.alphas_cumprod[t]
        x0 = 0.9 * torch.tanh(TARGET + 0.3 * torch.sin(x) * torch.cos(t / 300.0))
        return (x - abar.sqrt() * x0) / (1.0 - abar).sqrt()


def step_noises(count: int, seed: int, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def x_T_for(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_plan(plan: SamplingPlan, eps_model, x_T: torch.Tensor, noises) -> torch.Tensor:
    """x after every step, [steps, B, C, H, W], as DDPM.sample steps a batch."""
    batch, x, carried, trajectory = x_T.shape[0], x_T, {}, []
    for t, coefs, noise in zip(plan.timesteps, plan.coefs, noises, strict=True):
        slots = {Slot.X_T: x, Slot.EPS: eps_model(x, t.expand(batch)), Slot.NOISE: noise, **carried}
        step = denoise_step(coefs.expand(batch, -1), slots, plan.corrects)
        carried = next_carried(carried, step.x0, step.corrected, plan.carries)
        x = step.x_next
        trajectory.append(x)
    return torch.stack(trajectory)


def diffusers_trajectory(eps_model, scheduler, x_T: torch.Tensor, step, start: int = 0) -> torch.Tensor:
    """step(eps, t, x) -> the scheduler's output for that step; from scheduler.timesteps[start]."""
    x, trajectory = x_T, []
    for t in scheduler.timesteps[start:]:
        x = step(eps_model(x, t), t, x).prev_sample
        trajectory.append(x)
    return torch.stack(trajectory)
