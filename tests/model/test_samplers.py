"""Our sampling plans against diffusers' DDPMScheduler and DDIMScheduler, whole trajectories
from the same x_T with the same per-step noise; and batching that never changes an image."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import model
from model.samplers import denoise_step, image_seed, make_plan, spaced_timesteps

SHAPE = (3, 3, 8, 8)  # [B, C, H, W]: small, so T=1000 steps stay cheap
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours -> diffusers' name
VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
TARGET = torch.linspace(-1.0, 1.0, 8).repeat(3, 8, 1)  # [C, H, W]: a ramp touching both clip bounds


class FakeDenoiser:
    """A cheap stand-in for the U-Net: the eps a model of the one image TARGET would predict,
    plus an error term that sends x0_hat out of [-1, 1], so clipping changes the trajectory."""

    def __init__(self, config: model.DiffusionConfig):
        self.alphas_cumprod = model.GaussianDiffusion(config).schedule.alphas_cumprod.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1, 1, 1, 1)
        abar = self.alphas_cumprod[t]
        exact = (x - abar.sqrt() * TARGET) / (1.0 - abar).sqrt()
        return exact + 0.3 * torch.tanh(x) * torch.cos(t / 300.0)


def step_noises(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


def our_trajectory(config: model.DiffusionConfig, sampler: str, steps: int, eta: float, x_T, noises):
    """x after every step, [steps, B, C, H, W]."""
    plan = make_plan(model.GaussianDiffusion(config), sampler, steps, eta)
    eps_model, batch = FakeDenoiser(config), x_T.shape[0]
    x, clip, trajectory = x_T, torch.full((batch,), plan.clip_x0), []
    for t, coefs, noise in zip(plan.timesteps, plan.coefs, noises):
        x, _ = denoise_step(x, eps_model(x, t.expand(batch)), coefs.expand(batch, -1), clip, noise)
        trajectory.append(x)
    return torch.stack(trajectory)


def diffusers_trajectory(config: model.DiffusionConfig, scheduler, x_T, step):
    eps_model, x, trajectory = FakeDenoiser(config), x_T, []
    for t in scheduler.timesteps:
        x = step(eps_model(x, t), t, x).prev_sample
        trajectory.append(x)
    return torch.stack(trajectory)


def x_T_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


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
        config, scheduler, x_T, lambda eps, t, x: scheduler.step(eps, t, x, generator=generator)
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
    noise_at = {int(t): z for t, z in zip(scheduler.timesteps, noises)}
    config = model.DiffusionConfig()
    expected = diffusers_trajectory(
        config, scheduler, x_T,
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
    torch.testing.assert_close(ddim.coefs[:, 5], ddpm.coefs[:, 5], atol=1e-9, rtol=1e-9)  # sigma
    generator = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(20, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    no_clip = torch.zeros(20, dtype=torch.bool)
    ddim_x, _ = denoise_step(x, eps, ddim.coefs, no_clip, z)
    ddpm_x, _ = denoise_step(x, eps, ddpm.coefs, no_clip, z)
    torch.testing.assert_close(ddim_x, ddpm_x, atol=1e-9, rtol=1e-9)


def test_ancestral_sampling_adds_no_noise_on_the_last_step():
    for variance in ("fixedlarge", "fixedsmall"):
        plan = make_plan(model.GaussianDiffusion(model.DiffusionConfig(variance_type=variance)), "ddpm", 1000)
        assert plan.timesteps[-1] == 0 and plan.coefs[-1, 5] == 0
        assert (plan.coefs[:-1, 5] > 0).all()


def test_lanes_from_different_plans_and_steps_batch_like_they_run_alone():
    diffusion = model.GaussianDiffusion(model.DiffusionConfig())
    plans = [make_plan(diffusion, "ddpm", 1000), make_plan(diffusion, "ddpm", 50),
             make_plan(diffusion, "ddim", 20, eta=0.0), make_plan(diffusion, "ddim", 10, eta=0.7)]
    positions = [3, 49, 0, 9]  # early, last (sigma 0), first, last
    clips = torch.tensor([True, False, True, True])
    coefs = torch.stack([plan.coefs[i] for plan, i in zip(plans, positions)])
    generator = torch.Generator().manual_seed(0)
    x, eps, noise = (3 * torch.randn(4, 1, 6, 6, generator=generator) for _ in range(3))

    batched_x, batched_x0 = denoise_step(x, eps, coefs, clips, noise)
    for lane in range(4):
        alone_x, alone_x0 = denoise_step(
            x[lane : lane + 1], eps[lane : lane + 1], coefs[lane : lane + 1], clips[lane : lane + 1],
            noise[lane : lane + 1],
        )
        torch.testing.assert_close(batched_x[lane : lane + 1], alone_x, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched_x0[lane : lane + 1], alone_x0, atol=1e-6, rtol=0)
    assert batched_x0[0].abs().max() <= 1.0 and batched_x0[1].abs().max() > 1.0  # clip is per lane


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 10, 0.5)])
def test_an_image_is_the_same_alone_or_in_a_batch(tiny_ddpm, sampler, steps, eta):
    alone = tiny_ddpm.sample(1, steps=steps, sampler=sampler, eta=eta, seed=123)
    batch = tiny_ddpm.sample(4, steps=steps, sampler=sampler, eta=eta, seed=123)
    assert alone.shape == (1, 1, 28, 28) and batch.shape == (4, 1, 28, 28)
    torch.testing.assert_close(batch[:1], alone, atol=1e-4, rtol=0)
    assert (batch[1] - batch[0]).abs().max() > 0.1  # images of one request differ
    other_seed = tiny_ddpm.sample(1, steps=steps, sampler=sampler, eta=eta, seed=124)
    assert (other_seed - alone).abs().max() > 0.1



@pytest.mark.parametrize("seed", [0, 77, 2**63 - 1])
def test_every_reported_seed_reproduces_its_image_alone(tiny_ddpm, seed):
    batch = tiny_ddpm.sample(3, steps=5, sampler="ddpm", seed=seed)
    reported = [image_seed(seed, i) for i in range(3)]
    assert reported[0] == seed and len(set(reported)) == 3
    for i, image_seed_i in enumerate(reported):
        alone = tiny_ddpm.sample(1, steps=5, sampler="ddpm", seed=image_seed_i)
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
