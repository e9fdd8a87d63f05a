"""Our sampling plans against diffusers' DDPMScheduler and DDIMScheduler, whole trajectories
from the same x_T with the same per-step noise; and batching that never changes an image."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from sampling_trajectories import SHAPE, TARGET, FakeDenoiser, diffusers_trajectory, run_plan, step_noises, x_T_for

import model
from model.samplers import Slot, denoise_step, image_seed, make_plan, spaced_timesteps
from model.samplers.base import Coef, next_column
from tests.conftest import on_device

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours -> diffusers' name
VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
SIGMA = next_column(Slot.NOISE)  # the noise scale's column in a plan


@pytest.fixture(scope="module")
def tiny_ddpm(tiny_ddpm, test_device) -> model.DDPM:
    """This module samples on the test device (DDPM_TEST_DEVICE)."""
    return on_device(tiny_ddpm, test_device)


def our_trajectory(config: model.DiffusionConfig, sampler: str, steps: int, eta: float, x_T, noises):
    """x after every step, [steps, B, C, H, W]."""
    plan = make_plan(model.GaussianDiffusion(config), sampler, steps, eta)
    return run_plan(plan, FakeDenoiser(config), x_T, noises)


@pytest.mark.parametrize(
    "steps, variance, clip, schedule",
    [
        (1000, "fixedlarge", True, "linear"),  # the paper's CIFAR-10 sampler
        (1000, "fixedsmall", True, "linear"),  # the paper's LSUN / CelebA-HQ sampler
        (100, "fixedlarge", True, "linear"),  # respaced
        (100, "fixedsmall", True, "linear"),
        (37, "fixedlarge", False, "linear"),  # T // steps = 27 does not divide T; no clipping
        (100, "fixedlarge", True, "cosine"),
    ],
)
def test_ddpm_matches_diffusers_ddpm_scheduler(steps, variance, clip, schedule):
    config = model.DiffusionConfig(schedule=schedule, variance_type=variance, clip_x0=clip)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=SCHEDULES[schedule], clip_sample=clip,
        variance_type=VARIANCES[variance],
    )
    scheduler.set_timesteps(steps)
    # diffusers draws its noise from the generator at every step but the last (t = 0); our
    # last step has sigma = 0, so the same draws line up step by step.
    x_T, noises = x_T_for(), step_noises(steps, seed=7)
    generator = torch.Generator().manual_seed(7)
    expected = diffusers_trajectory(
        FakeDenoiser(config), scheduler, x_T, lambda eps, t, x: scheduler.step(eps, t, x, generator=generator)
    )
    got = our_trajectory(config, "ddpm", steps, 0.0, x_T, noises)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[-1], TARGET.expand(SHAPE), atol=0.05, rtol=0)  # it denoised


def test_the_fake_denoiser_makes_clipping_matter():
    """Otherwise the clip cases above would not test clipping."""
    x_T, noises = x_T_for(), step_noises(100, seed=7)
    clipped = our_trajectory(model.DiffusionConfig(clip_x0=True), "ddpm", 100, 0.0, x_T, noises)
    unclipped = our_trajectory(model.DiffusionConfig(clip_x0=False), "ddpm", 100, 0.0, x_T, noises)
    assert (clipped - unclipped).abs().max() > 0.1


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_matches_diffusers_ddim_scheduler(steps, eta):
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True, steps_offset=0)
    scheduler.set_timesteps(steps)
    x_T, noises = x_T_for(1), step_noises(steps, seed=3)
    noise_at = {int(t): z for t, z in zip(scheduler.timesteps, noises, strict=True)}
    config = model.DiffusionConfig()
    expected = diffusers_trajectory(
        FakeDenoiser(config), scheduler, x_T,
        lambda eps, t, x: scheduler.step(eps, t, x, eta=eta, variance_noise=noise_at[int(t)]),
    )
    got = our_trajectory(config, "ddim", steps, eta, x_T, noises)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [1, 7, 37, 50, 100, 333, 999, 1000])
def test_spacing_is_diffusers_leading_spacing(steps):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    assert spaced_timesteps(1000, steps).tolist() == scheduler.timesteps.tolist()


def test_ddim_with_eta_one_is_ancestral_sampling_with_the_posterior_variance():
    """Song et al. 2021: eta = 1 makes DDIM the DDPM sampler with sigma^2 = beta_tilde."""
    diffusion = model.GaussianDiffusion(model.DiffusionConfig(variance_type="fixedsmall", clip_x0=False))
    ddim, ddpm = make_plan(diffusion, "ddim", 20, eta=1.0), make_plan(diffusion, "ddpm", 20)
    torch.testing.assert_close(ddim.coefs[:, SIGMA], ddpm.coefs[:, SIGMA], atol=1e-9, rtol=1e-9)
    generator = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(20, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    slots = {Slot.X_T: x, Slot.EPS: eps, Slot.NOISE: z}
    ddim_x = denoise_step(ddim.coefs, slots).x_next
    ddpm_x = denoise_step(ddpm.coefs, slots).x_next
    torch.testing.assert_close(ddim_x, ddpm_x, atol=1e-9, rtol=1e-9)


def test_ancestral_sampling_adds_no_noise_on_the_last_step():
    for variance in ("fixedlarge", "fixedsmall"):
        plan = make_plan(model.GaussianDiffusion(model.DiffusionConfig(variance_type=variance)), "ddpm", 1000)
        assert plan.timesteps[-1] == 0 and plan.coefs[-1, SIGMA] == 0
        assert (plan.coefs[:-1, SIGMA] > 0).all()


def original_step(x_t, eps, coefs, clip, noise):
    """The four-term step DDPM and DDIM used before the multistep samplers came, kept to prove
    that their images have not changed by a bit (the shipped sample grid depends on them)."""
    c = coefs.to(x_t.dtype)[:, :, None, None, None]
    x0 = c[:, 0] * x_t - c[:, 1] * eps
    bound = torch.where(clip, 1.0, float("inf")).to(x_t.dtype)[:, None, None, None]
    x0 = torch.maximum(torch.minimum(x0, bound), -bound)
    return c[:, 2] * x0 + c[:, 3] * x_t + c[:, 4] * eps + c[:, 5] * noise, x0


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.6)])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_and_ddim_steps_are_bit_identical_to_the_original_formula(sampler, eta, clip):
    plan = make_plan(model.GaussianDiffusion(model.DiffusionConfig(clip_x0=clip)), sampler, 50, eta)
    original_columns = [Coef.X0_FROM_XT, Coef.X0_FROM_EPS, next_column(Slot.X0), next_column(Slot.X_T),
                        next_column(Slot.EPS), SIGMA]
    generator = torch.Generator().manual_seed(1)
    x, eps, z = (3 * torch.randn(50, 1, 6, 6, generator=generator) for _ in range(3))
    slots = {Slot.X_T: x, Slot.EPS: eps}
    if plan.noisy:
        slots[Slot.NOISE] = z
    step = denoise_step(plan.coefs, slots)
    expected_x, expected_x0 = original_step(x, eps, plan.coefs[:, original_columns], torch.full((50,), clip), z)
    assert torch.equal(step.x_next, expected_x) and torch.equal(step.x0, expected_x0)


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 10, 0.5), ("dpmpp_2m", 8, 0.0),
                                                ("dpmpp_2m_sde", 8, 0.0), ("unipc", 8, 0.0)])
def test_an_image_is_the_same_alone_or_in_a_batch(tiny_ddpm, sampler, steps, eta):
    alone = tiny_ddpm.sample(1, steps=steps, sampler=sampler, eta=eta, seed=123)
    batch = tiny_ddpm.sample(4, steps=steps, sampler=sampler, eta=eta, seed=123)
    assert alone.shape == (1, 1, 28, 28) and batch.shape == (4, 1, 28, 28)
    torch.testing.assert_close(batch[:1], alone, atol=1e-4, rtol=0)
    assert (batch[1] - batch[0]).abs().max() > 0.1  # images of one request differ
    other_seed = tiny_ddpm.sample(1, steps=steps, sampler=sampler, eta=eta, seed=124)
    assert (other_seed - alone).abs().max() > 0.1



@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m_sde", "unipc"])
@pytest.mark.parametrize("seed", [0, 77, 2**63 - 1])
def test_every_reported_seed_reproduces_its_image_alone(tiny_ddpm, seed, sampler):
    batch = tiny_ddpm.sample(3, steps=5, sampler=sampler, seed=seed)
    reported = [image_seed(seed, i) for i in range(3)]
    assert reported[0] == seed and len(set(reported)) == 3
    for i, image_seed_i in enumerate(reported):
        alone = tiny_ddpm.sample(1, steps=5, sampler=sampler, seed=image_seed_i)
        torch.testing.assert_close(alone[0], batch[i], atol=1e-4, rtol=0, msg=f"image {i}")


def test_a_request_continued_from_first_index_matches_one_call(tiny_ddpm):
    whole = tiny_ddpm.sample(5, steps=4, sampler="ddim", seed=8)
    parts = [tiny_ddpm.sample(count, steps=4, sampler="ddim", seed=8, first_index=start)
             for start, count in [(0, 2), (2, 2), (4, 1)]]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-4, rtol=0)

def test_given_noise_fixes_a_deterministic_sample(tiny_ddpm):
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    first = tiny_ddpm.sample(2, steps=10, sampler="ddim", seed=1, noise=x_T)
    second = tiny_ddpm.sample(2, steps=10, sampler="ddim", seed=2, noise=x_T)
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)
    assert first.min() >= -1.0 and first.max() <= 1.0


def test_image_seeds_are_stable_and_distinct():
    seeds = [image_seed(0, i) for i in range(100)] + [image_seed(1, i) for i in range(100)]
    assert len(set(seeds)) == 200
    assert all(0 <= s < 2**63 for s in seeds + [image_seed(2**63 - 1, i) for i in range(5)])
    assert image_seed(0, 3) == image_seed(0, 3)


@pytest.mark.parametrize(
    "sampler, steps, eta, message",
    [
        ("ddpm", 0, 0.0, "steps must be between 1 and 1000"),
        ("ddim", 1001, 0.0, "steps must be between 1 and 1000"),
        ("ddim", 50, -0.1, "eta must be >= 0"),
        ("euler", 50, 0.0, "unknown sampler 'euler'"),
    ],
)
def test_bad_sampling_options_are_refused(sampler, steps, eta, message):
    with pytest.raises(ValueError, match=message):
        make_plan(model.GaussianDiffusion(model.DiffusionConfig()), sampler, steps, eta)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be >= 1"),
        (dict(n=1, steps=0), "steps must be between 1 and 50"),  # not "0 means all T steps"
        (dict(n=1, steps=51), "steps must be between 1 and 50"),
    ],
)
def test_bad_sample_requests_are_refused(tiny_ddpm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_ddpm.sample(**kwargs)


def test_sample_rejects_noise_of_the_wrong_shape(tiny_ddpm):
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 1, 28, 28\)"):
        tiny_ddpm.sample(2, steps=2, noise=torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_a_later_start_keeps_the_rows_of_samplers_without_history(sampler, eta):
    diffusion = model.GaussianDiffusion(model.DiffusionConfig())
    full, later = make_plan(diffusion, sampler, 20, eta), make_plan(diffusion, sampler, 20, eta, start=7)
    assert torch.equal(later.timesteps, full.timesteps[7:]) and torch.equal(later.coefs, full.coefs[7:])


@pytest.mark.parametrize("start", [-1, 20])
def test_a_start_outside_the_plan_is_refused(start):
    with pytest.raises(ValueError, match="start must be a step of the plan"):
        make_plan(model.GaussianDiffusion(model.DiffusionConfig()), "ddpm", 20, start=start)
