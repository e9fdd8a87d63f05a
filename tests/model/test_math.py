"""Schedules and diffusion math against closed forms (Ho et al. 2020; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Normal, kl_divergence
from torch.overrides import TorchFunctionMode

import model
from model.diffusion import discretized_gaussian_log_likelihood, extract, normal_kl
from model.schedule import NoiseSchedule

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def paper() -> model.GaussianDiffusion:
    return model.GaussianDiffusion(model.DiffusionConfig())


def oracle_eps(diffusion: model.GaussianDiffusion, x0: torch.Tensor):
    """The perfect eps model for data that is exactly x0: it inverts q_sample."""

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = extract(diffusion.schedule.alphas_cumprod, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    return eps


def quantized_images(shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    """Images on the 256 levels of [-1, 1], both extremes included, as the data pipeline makes them."""
    levels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    levels.view(-1)[:2] = torch.tensor([0, 255])
    return (levels.to(dtype) / 127.5 - 1.0)


# -- schedules -------------------------------------------------------------------------------
def test_linear_betas_are_the_papers(paper):
    betas = paper.schedule.betas
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    torch.testing.assert_close(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_alphas_cumprod_is_the_running_product(paper):
    s = paper.schedule
    for t in (0, 1, 10, 500, 999):
        assert s.alphas_cumprod[t].item() == pytest.approx(math.prod(1.0 - b for b in s.betas[: t + 1].tolist()))
    assert s.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert 4e-5 < s.alphas_cumprod[-1] < 5e-5  # x_T is almost pure noise (paper: abar_T ~ 4e-5)


def test_posterior_is_the_product_of_the_two_gaussians(paper):
    """q(x_{t-1}|x_t,x0) ~ q(x_t|x_{t-1}) q(x_{t-1}|x0): precisions add, means weigh by precision."""
    s = paper.schedule
    beta, alpha, abar_prev = s.betas[1:], s.alphas[1:], s.alphas_cumprod_prev[1:]
    precision = 1.0 / (1.0 - abar_prev) + alpha / beta
    torch.testing.assert_close(s.posterior_variance[1:], 1.0 / precision, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef1[1:], abar_prev.sqrt() / (1.0 - abar_prev) / precision)
    torch.testing.assert_close(s.posterior_mean_coef2[1:], alpha.sqrt() / beta / precision)
    # t = 0: x_{-1} is x0 itself.
    assert s.posterior_variance[0] == 0.0 and s.posterior_mean_coef2[0] == 0.0
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0, abs=1e-12)


def test_log_variances_replace_the_zero_at_t0(paper):
    s = paper.schedule
    assert s.posterior_log_variance_clipped[0] == math.log(s.posterior_variance[1])
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log())
    large = s.model_log_variance("fixedlarge")
    assert large[0] == math.log(s.posterior_variance[1])
    torch.testing.assert_close(large[1:], s.betas[1:].log())
    torch.testing.assert_close(s.model_log_variance("fixedsmall"), s.posterior_log_variance_clipped)


def test_cosine_schedule_follows_its_formula():
    s = NoiseSchedule.from_config(model.DiffusionConfig(schedule="cosine"))
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    expected_abar = torch.tensor([f[t + 1] / f[0] for t in range(1000)], dtype=torch.float64)
    unclipped = s.betas < 0.999  # only the last steps hit the cap
    assert unclipped[:-1].all() and s.betas[-1] == 0.999
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected_abar[:-1], rtol=1e-9, atol=1e-15)
    diffusers_betas = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas.double()
    torch.testing.assert_close(s.betas, diffusers_betas, rtol=1e-5, atol=1e-7)


# -- forward process -------------------------------------------------------------------------
def test_q_sample_has_the_marginal_mean_and_std(paper):
    t = torch.tensor([0, 100, 500, 999])
    x0 = torch.tensor([1.0, -0.5, 0.3, 1.0])[:, None].expand(4, 40_000)
    noise = torch.randn(4, 40_000, generator=torch.Generator().manual_seed(0))
    x_t = paper.q_sample(x0, t, noise)
    abar = paper.schedule.alphas_cumprod[t].float()
    # 40k draws: the standard error of the mean is <= 0.005, of the std <= 0.004.
    torch.testing.assert_close(x_t.mean(1), abar.sqrt() * x0[:, 0], atol=0.02, rtol=0)
    torch.testing.assert_close(x_t.std(1), (1.0 - abar).sqrt(), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_predict_x0_inverts_q_sample(paper, dtype, tolerance):
    x0 = quantized_images((6, 3, 4, 4), dtype=dtype)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x_t = paper.q_sample(x0, t, noise)
    assert x_t.dtype == dtype
    torch.testing.assert_close(paper.predict_x0(x_t, t, noise), x0, atol=tolerance, rtol=0)


def test_q_posterior_uses_a_row_per_timestep(paper):
    x0, x_t = quantized_images((3, 2, 2, 2)), torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 7, 999])
    mean, log_variance = paper.q_posterior(x0, x_t, t)
    s = paper.schedule
    for row, step in enumerate(t.tolist()):
        expected = s.posterior_mean_coef1[step] * x0[row] + s.posterior_mean_coef2[step] * x_t[row]
        torch.testing.assert_close(mean[row], expected)
        assert log_variance[row].item() == s.posterior_log_variance_clipped[step]


def test_extract_gathers_per_sample_rows_in_the_dtype_of_the_data(paper):
    values = extract(paper.schedule.betas, torch.tensor([0, 999]), torch.zeros(2, 3, 4, 4))
    assert values.shape == (2, 1, 1, 1) and values.dtype == torch.float32
    assert values.flatten().tolist() == pytest.approx([1e-4, 0.02])


class Float64Conversions(TorchFunctionMode):
    """Counts Tensor.to calls on float64 tensors: a schedule table copied (or cast) per call."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to and args[0].dtype == torch.float64:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_diffusion_copies_its_float64_tables_once_per_device_and_dtype():
    diffusion = model.GaussianDiffusion(model.DiffusionConfig(num_timesteps=10))
    x0, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])

    def use_every_table():
        x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
        diffusion.q_posterior(diffusion.predict_x0(x_t, t, x0), x_t, t)
        diffusion.prior_bpd(x0)

    with Float64Conversions() as first_use:
        use_every_table()
    with Float64Conversions() as later_use:
        use_every_table()
    assert first_use.count > 0 and later_use.count == 0


@pytest.mark.gpu
def test_the_diffusion_math_never_makes_the_host_wait_for_the_gpu_once_warm():
    diffusion = model.GaussianDiffusion(model.DiffusionConfig(num_timesteps=10))
    x0, t = torch.randn(2, 1, 4, 4, device="cuda"), torch.tensor([3, 7], device="cuda")
    diffusion.q_sample(x0, t, x0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        diffusion.q_sample(x0, t, x0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- likelihood pieces -------------------------------------------------------------------------
def test_normal_kl_is_zero_between_identical_gaussians():
    mean, log_variance = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    assert normal_kl(mean, log_variance, mean, log_variance).abs().max() < 1e-12


def test_normal_kl_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(200, generator=g, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert (expected > 0).all()


@pytest.mark.parametrize("mean", [-1.2, -1.0, -0.3, 0.0, 0.71, 1.0])
@pytest.mark.parametrize("log_scale", [-7.0, -4.0, -1.0, 0.5])
def test_discretized_gaussian_is_a_distribution_over_the_256_levels(mean, log_scale):
    levels = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(
        levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
    )
    assert (log_p <= 1e-12).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    if log_scale <= -4.0:  # narrower than a few bins: the bin around the mean is the likeliest
        assert log_p.argmax() == (levels - mean).abs().argmin()  # (wider, the open edge bins win)


def test_discretized_gaussian_is_close_to_the_exact_normal_bins():
    """The tanh CDF approximation (kept for comparability with the paper) is within 1e-3."""
    levels = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)[1:-1]
    mean, std = torch.zeros_like(levels) + 0.1, 0.3
    exact = Normal(mean, std)
    expected = (exact.cdf(levels + 1 / 255) - exact.cdf(levels - 1 / 255)).log()
    got = discretized_gaussian_log_likelihood(levels, mean, torch.full_like(levels, math.log(std)))
    torch.testing.assert_close(got.exp(), expected.exp(), atol=1e-3, rtol=0)


# -- the bound ---------------------------------------------------------------------------------
def test_prior_term_matches_the_closed_form(paper):
    x0 = quantized_images((2, 1, 4, 4))
    abar = paper.schedule.alphas_cumprod[-1].item()
    kl = 0.5 * (-1.0 - math.log(1 - abar) + (1 - abar) + abar * x0**2)  # KL(N(sqrt(abar) x0, 1-abar) || N(0,1))
    torch.testing.assert_close(paper.prior_bpd(x0), kl.mean(dim=(1, 2, 3)) / LN2)
    assert paper.prior_bpd(x0).max() < 1e-4  # x_T carries almost nothing of x0


def test_training_loss_is_zero_for_the_perfect_model(paper):
    x0 = quantized_images((4, 1, 4, 4))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = paper.training_loss(lambda x_t, t: noise, x0, torch.tensor([0, 3, 500, 999]), noise)
    assert loss.item() == 0.0


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
def test_vlb_terms_of_the_perfect_model_are_the_variance_mismatch(variance):
    """With eps exact, p's mean is q's posterior mean: only the variances can differ."""
    diffusion = model.GaussianDiffusion(model.DiffusionConfig(variance_type=variance))
    x0 = quantized_images((4, 1, 4, 4))
    t = torch.tensor([1, 2, 500, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    terms = diffusion.vlb_terms(oracle_eps(diffusion, x0), x0, t, noise)
    s = diffusion.schedule
    true_lv, model_lv = s.posterior_variance[t].log(), s.model_log_variance(variance)[t]
    expected = 0.5 * (-1.0 + model_lv - true_lv + (true_lv - model_lv).exp()) / LN2
    torch.testing.assert_close(terms, expected, atol=1e-9, rtol=1e-6)
    assert terms.abs().max() < 1e-9 if variance == "fixedsmall" else (terms > 0).all()


def test_bits_per_dim_of_the_perfect_model_is_prior_plus_decoder():
    """fixedsmall and exact eps: every L_{t-1} for t >= 1 vanishes, leaving L_T and L_0.
    L_0 is the decoder's NLL with mean x0 and variance beta_tilde_1, in closed form."""
    diffusion = model.GaussianDiffusion(model.DiffusionConfig(num_timesteps=50, variance_type="fixedsmall"))
    x0 = quantized_images((2, 1, 4, 4))
    generators = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)]
    total, terms = diffusion.bits_per_dim(oracle_eps(diffusion, x0), x0, generators)
    assert terms.shape == (2, 50)
    assert terms[:, 1:].abs().max() < 1e-9

    std = diffusion.schedule.posterior_variance[1].sqrt()
    cdf = Normal(0.0, std.item()).cdf
    half_bin = torch.tensor(1 / 255, dtype=torch.float64)
    interior = cdf(half_bin) - cdf(-half_bin)
    edge = cdf(half_bin)  # x0 = +-1: the outer bin is open-ended
    p = torch.where(x0.abs() > 0.999, edge, interior)
    decoder_bits = -(p.log().mean(dim=(1, 2, 3))) / LN2
    torch.testing.assert_close(terms[:, 0], decoder_bits, atol=2e-3, rtol=0)  # tanh CDF approximation
    torch.testing.assert_close(total, diffusion.prior_bpd(x0) + terms[:, 0])
