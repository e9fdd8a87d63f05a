"""The multistep samplers (dpmpp_2m, dpmpp_2m_sde, unipc) against diffusers' schedulers built
from the same DDPM config, whole trajectories; their history; and batches that mix lanes of
every sampler at different steps without changing any lane's numbers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from sampling_trajectories import (
    SHAPE,
    BoundedDenoiser,
    FakeDenoiser,
    diffusers_trajectory,
    run_plan,
    step_noises,
    x_T_for,
)

import model
from model.samplers import CARRIED, SAMPLERS, Slot, denoise_step, make_plan, next_carried
from model.samplers.base import linspace_timesteps, next_column

# diffusers' set_timesteps warns under numpy 2 at every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MULTISTEP = ["dpmpp_2m", "dpmpp_2m_sde", "unipc"]
STEP_COUNTS = [1, 2, 3, 5, 10, 14, 15, 25, 50]  # both sides of diffusers' lower_order_final rule (< 15 steps)


def diffusers_scheduler(sampler: str):
    """The scheduler as diffusers builds it from the DDPM config (T = 1000, linear 1e-4..0.02),
    every other option at its default: solver_order 2, lower_order_final, final sigma 0, linspace
    timesteps, no thresholding."""
    ddpm_config = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if sampler == "unipc":
        return UniPCMultistepScheduler(**ddpm_config)
    algorithm = "sde-dpmsolver++" if sampler == "dpmpp_2m_sde" else "dpmsolver++"
    return DPMSolverMultistepScheduler(**ddpm_config, algorithm_type=algorithm)


def compare_with_diffusers(sampler: str, steps: int, config: model.DiffusionConfig, denoiser, start: int = 0) -> None:
    """start > 0: a chain begun at that step (an image encoded there), diffusers' set_begin_index."""
    scheduler = diffusers_scheduler(sampler)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(start)
    x_T, noises = x_T_for(3), step_noises(steps - start, seed=5)
    noise_at = {int(t): z for t, z in zip(scheduler.timesteps[start:], noises, strict=True)}
    extra = (lambda t: {"variance_noise": noise_at[int(t)]}) if sampler == "dpmpp_2m_sde" else (lambda t: {})
    expected = diffusers_trajectory(denoiser, scheduler, x_T, lambda eps, t, x: scheduler.step(eps, t, x, **extra(t)),
                                    start)
    plan = make_plan(model.GaussianDiffusion(config), sampler, steps, start=start)
    assert plan.timesteps.tolist() == scheduler.timesteps[start:].tolist()
    got = run_plan(plan, denoiser, x_T, noises)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("sampler", MULTISTEP)
def test_multistep_samplers_match_diffusers_where_clipping_is_inactive(sampler, steps):
    """Our model config clips x0_hat to [-1, 1] (diffusers' schedulers cannot); with a model
    whose predictions stay inside, clipping is inactive and the two must agree."""
    config = model.DiffusionConfig(clip_x0=True)
    compare_with_diffusers(sampler, steps, config, BoundedDenoiser(config))


@pytest.mark.parametrize("steps, start", [(10, 1), (10, 6), (10, 9), (25, 12)])
@pytest.mark.parametrize("sampler", MULTISTEP)
def test_a_chain_begun_later_matches_diffusers_from_its_begin_index(sampler, steps, start):
    """Image to image with a multistep solver: no history at the first step, so first order
    there (and UniPC corrects nothing yet), as diffusers after set_begin_index."""
    config = model.DiffusionConfig(clip_x0=True)
    compare_with_diffusers(sampler, steps, config, BoundedDenoiser(config), start)


@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize("sampler", MULTISTEP)
def test_multistep_samplers_match_diffusers_without_clipping(sampler, steps):
    """Predictions far outside [-1, 1], neither side clipping."""
    config = model.DiffusionConfig(clip_x0=False)
    compare_with_diffusers(sampler, steps, config, FakeDenoiser(config))


@pytest.mark.parametrize("sampler", MULTISTEP)
def test_clipping_keeps_the_data_prediction_and_the_image_in_range(sampler):
    x_T, noises = x_T_for(), step_noises(10, seed=7)
    runs = {}
    for clip in (True, False):
        config = model.DiffusionConfig(clip_x0=clip)
        plan = make_plan(model.GaussianDiffusion(config), sampler, 10)
        runs[clip] = run_plan(plan, FakeDenoiser(config), x_T, noises)
    assert runs[True][-1].abs().max() <= 1.0  # the last step lands on the clipped x0_hat
    assert (runs[True] - runs[False]).abs().max() > 0.1


def test_linspace_timesteps_are_the_default_spacing_of_diffusers_multistep_schedulers():
    schedulers = [diffusers_scheduler("dpmpp_2m"), diffusers_scheduler("unipc")]
    for steps in range(1, 1000):
        ours = linspace_timesteps(1000, steps).tolist()
        for scheduler in schedulers:
            scheduler.set_timesteps(steps)
            assert ours == scheduler.timesteps.tolist(), steps
    # At steps = T diffusers' rounding repeats t = 500; we visit every t once.
    assert linspace_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("sampler", MULTISTEP)
def test_plans_of_any_step_count_have_finite_coefficients(sampler):
    diffusion = model.GaussianDiffusion(model.DiffusionConfig())
    for steps in (1, 2, 999, 1000):
        assert torch.isfinite(make_plan(diffusion, sampler, steps).coefs).all(), steps  # the config clips: bound 1


@pytest.mark.parametrize("sampler", MULTISTEP)
def test_the_first_step_reads_no_history_and_the_last_lands_on_x0_hat(sampler):
    plan = make_plan(model.GaussianDiffusion(model.DiffusionConfig()), sampler, 10)
    history = [next_column(slot) for slot in CARRIED]
    assert (plan.coefs[0, history] == 0).all()
    last = {slot: plan.coefs[-1, next_column(slot)].item() for slot in Slot}
    assert last == {slot: 1.0 if slot is Slot.X0 else 0.0 for slot in Slot}


@pytest.mark.parametrize("sampler, eta, draws", [
    ("ddpm", 0.0, 11), ("ddim", 0.0, 1), ("ddim", 0.5, 11), ("dpmpp_2m", 0.0, 1), ("dpmpp_2m_sde", 0.0, 11),
    ("unipc", 0.0, 1),
])
def test_only_stochastic_samplers_draw_noise_after_x_T(sampler, eta, draws):
    plan = make_plan(model.GaussianDiffusion(model.DiffusionConfig()), sampler, 10, eta)
    assert plan.draws == draws and plan.noisy == (draws > 1)


def test_the_samplers_keep_only_the_history_they_read():
    diffusion = model.GaussianDiffusion(model.DiffusionConfig())
    carries = {name: make_plan(diffusion, name, 10).carries for name in SAMPLERS}
    assert carries == {"ddpm": set(), "ddim": set(), "dpmpp_2m": {Slot.PREV_X0}, "dpmpp_2m_sde": {Slot.PREV_X0},
                       "unipc": {Slot.PREV_X0, Slot.PREV_PREV_X0, Slot.CORRECTED}}
    assert [name for name in SAMPLERS if make_plan(diffusion, name, 10).corrects] == ["unipc"]


class SimulatedLane:
    """One image stepped as the engine steps it: its own plan, position, noise and history."""

    def __init__(self, plan, seed: int):
        self.plan, self.cursor, self.carried = plan, 0, {}
        self.x = x_T_for(seed, (1, *SHAPE[1:]))[0]
        self.noises = [z[0] for z in step_noises(len(plan), seed + 100, (1, *SHAPE[1:]))]


def step_together(lanes: list[SimulatedLane], eps_model) -> None:
    """One batched step over lanes of any plans, gathering each slot some lane holds, with zeros
    for the lanes that lack it (what server.engine.runner does)."""
    if not lanes:
        return
    x = torch.stack([lane.x for lane in lanes])
    t = torch.stack([lane.plan.timesteps[lane.cursor] for lane in lanes])
    slots = {Slot.X_T: x, Slot.EPS: eps_model(x, t)}
    zeros = torch.zeros_like(lanes[0].x)
    if any(lane.plan.noisy for lane in lanes):
        slots[Slot.NOISE] = torch.stack([lane.noises[lane.cursor] if lane.plan.noisy else zeros for lane in lanes])
    for slot in CARRIED:
        if any(slot in lane.plan.carries for lane in lanes):
            slots[slot] = torch.stack([lane.carried.get(slot, zeros) for lane in lanes])
    coefs = torch.stack([lane.plan.coefs[lane.cursor] for lane in lanes])
    step = denoise_step(coefs, slots, any(lane.plan.corrects for lane in lanes))
    for row, lane in enumerate(lanes):
        corrected = None if step.corrected is None else step.corrected[row]
        lane.carried = next_carried(lane.carried, step.x0[row], corrected, lane.plan.carries)
        lane.x = step.x_next[row]
        lane.cursor += 1


def test_lanes_of_every_sampler_at_different_steps_batch_exactly_like_they_run_alone():
    """Lanes of all five samplers, two configs (clipping and not) and different step counts run
    in batches whose members change at every step; each lane's numbers equal its run alone."""
    lanes = [("ddpm", 12, 0.0, True), ("ddim", 7, 0.6, True), ("dpmpp_2m", 9, 0.0, True),
             ("dpmpp_2m_sde", 11, 0.0, False), ("unipc", 8, 0.0, True), ("unipc", 3, 0.0, False),
             ("dpmpp_2m", 13, 0.0, False)]  # (sampler, steps, eta, clip)
    plans = [make_plan(model.GaussianDiffusion(model.DiffusionConfig(clip_x0=clip)), sampler, steps, eta)
             for sampler, steps, eta, clip in lanes]
    eps_model = FakeDenoiser(model.DiffusionConfig())
    crowd = [SimulatedLane(plan, seed) for seed, plan in enumerate(plans)]
    for round_ in range(100):
        running = [lane for lane in crowd if lane.cursor < len(lane.plan)]
        if not running:
            break
        step_together([lane for i, lane in enumerate(running) if (i + round_) % 3], eps_model)  # a changing subset
        step_together([lane for i, lane in enumerate(running) if not (i + round_) % 3], eps_model)
    for seed, (plan, lane) in enumerate(zip(plans, crowd, strict=True)):
        alone = SimulatedLane(plan, seed)
        while alone.cursor < len(plan):
            step_together([alone], eps_model)
        assert lane.cursor == len(plan) and torch.equal(lane.x, alone.x), f"lane {seed}"
