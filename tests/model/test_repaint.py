"""RePaint's resampling (model.samplers.repaint): the order diffusers visits, where each step
lands, and the noising back up."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import RePaintScheduler

import model
from model.samplers import REACHES_X0, make_plan, renoise_coefs, resample, resampling_rows

# diffusers' set_timesteps warns under numpy 2 at every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DIFFUSION = model.GaussianDiffusion(model.DiffusionConfig())


def diffusers_model_steps(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The timesteps at which diffusers' RePaintPipeline calls the U-Net: those below the one
    before (the others are its undo steps, noising back up)."""
    scheduler = RePaintScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    scheduler.set_timesteps(steps, jump_length, jump_n_sample)
    visited = scheduler.timesteps.tolist()
    return [t for last, t in itertools.pairwise([float("inf"), *visited]) if t < last]


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(10, 3, 2), (25, 10, 10), (50, 5, 3), (7, 10, 4),
                                                               (250, 10, 10), (20, 1, 2)])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_resampled_plan_visits_diffusers_repaint_timesteps(sampler, steps, jump_length, jump_n_sample):
    plan = resample(make_plan(DIFFUSION, sampler, steps), jump_length, jump_n_sample)
    assert plan.timesteps.tolist() == diffusers_model_steps(steps, jump_length, jump_n_sample)


def test_each_step_lands_one_step_down_and_jumps_go_back_up():
    full = make_plan(DIFFUSION, "ddpm", 10)
    plan = resample(full, 3, 2)
    rows = resampling_rows(10, 3, 2)
    assert torch.equal(plan.coefs, full.coefs[rows])  # the same steps, revisited
    reaches, timesteps = plan.reaches.tolist(), plan.timesteps.tolist()
    assert reaches[-1] == REACHES_X0 and reaches.count(REACHES_X0) == 2  # x_0, a jump from there, x_0 again
    jumps = [k for k in range(len(plan) - 1) if timesteps[k + 1] != reaches[k]]
    assert jumps and all(timesteps[k + 1] > reaches[k] for k in jumps)
    assert all(timesteps[k + 1] == reaches[k] for k in range(len(plan) - 1) if k not in jumps)


def test_one_sample_per_jump_is_the_plain_plan():
    full = make_plan(DIFFUSION, "ddim", 20)
    plan = resample(full, 5, 1)
    assert torch.equal(plan.timesteps, full.timesteps) and torch.equal(plan.coefs, full.coefs)


def test_multistep_plans_cannot_jump():
    with pytest.raises(ValueError, match="without history"):
        resample(make_plan(DIFFUSION, "dpmpp_2m", 10), 3, 2)


def test_renoising_is_the_forward_process_between_two_timesteps():
    abar = DIFFUSION.schedule.alphas_cumprod
    kept, fresh = renoise_coefs(abar, REACHES_X0, 400)
    assert kept == pytest.approx(float(abar[400].sqrt())) and fresh == pytest.approx(float((1 - abar[400]).sqrt()))
    # from x_s to x_t, then from x_0 to x_s: the mean and variance of q(x_t | x_0)
    kept_st, fresh_st = renoise_coefs(abar, 100, 400)
    kept_0s, fresh_0s = renoise_coefs(abar, REACHES_X0, 100)
    assert kept_st * kept_0s == pytest.approx(kept)
    assert (kept_st * fresh_0s) ** 2 + fresh_st**2 == pytest.approx(fresh**2)
