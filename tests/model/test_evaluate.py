"""ddpm-eval: bits/dim against a slow reference loop, the Frechet distance against closed
forms, and each command end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import model
from model.data import to_model_range
from model.diffusion import discretized_gaussian_log_likelihood, normal_kl
from model.evaluate import evaluate, negative_log_likelihood
from model.fid import INCEPTION_URL, feature_statistics, frechet_distance
from model.samplers import image_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_ddpm() -> model.DDPM:
    """The tiny preset with every weight nudged off its (partly zero) init, so eps_theta is not 0."""
    config = model.preset("tiny")
    torch.manual_seed(0)
    unet = model.UNet(config.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.DDPM(unet.eval(), config, {"step": 0})


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_ddpm):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    model.save(tiny_ddpm, path)
    return path


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    # 1-D: the 2-Wasserstein distance (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[1.0]])) == pytest.approx(5.0)


def test_frechet_distance_matches_the_eigenvalues_of_the_covariance_product():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(8), b @ b.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    # Reference: tr sqrt(S1 S2) = sum of the square roots of the (real, >= 0) eigenvalues of S1 S2.
    trace_sqrt = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_rank_deficient_sample_statistics_is_finite():
    rng = np.random.default_rng(2)
    mu1, sigma1 = feature_statistics(rng.normal(size=(5, 20)))  # 5 samples in 20 dims: rank 4
    mu2, sigma2 = feature_statistics(rng.normal(loc=1.0, size=(5, 20)))
    distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert math.isfinite(distance) and distance > 0
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(mu1, sigma1, mu2[:3], sigma2[:3, :3])


def reference_bits_per_dim(ddpm: model.DDPM, images: torch.Tensor, seed: int) -> tuple[float, float, float]:
    """(prior, decoder, sum of KL) straight from the paper's formulas, one image and one t at a time."""
    s = ddpm.diffusion.schedule
    betas, abar = s.betas, s.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    # fixedlarge: sigma_t^2 = beta_t, with beta_tilde_1 at t = 0.
    model_var = torch.cat([beta_tilde[1:2], betas[1:]])
    prior = decoder = kl = 0.0
    for index, image in enumerate(images):
        x0 = to_model_range(image)[None]
        generator = image_generator(seed, index)
        ln2_dims = math.log(2.0) * x0.numel()
        big_t = len(betas) - 1
        prior += normal_kl(abar[big_t].sqrt() * x0, torch.log(1 - abar[big_t]), torch.zeros(()), torch.zeros(())).sum().item() / ln2_dims
        for t in range(len(betas)):
            noise = torch.randn(x0.shape[1:], generator=generator)[None]
            x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise
            eps = ddpm.unet(x_t.float(), torch.tensor([t]))
            x0_hat = (x_t - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            c1 = betas[t] * abar_prev[t].sqrt() / (1 - abar[t])
            c2 = (1 - abar_prev[t]) * (1 - betas[t]).sqrt() / (1 - abar[t])
            model_mean = c1 * x0_hat + c2 * x_t
            if t == 0:
                log_scale = 0.5 * torch.log(model_var[0])
                decoder -= discretized_gaussian_log_likelihood(x0, model_mean, log_scale).sum().item() / ln2_dims
            else:
                true_mean = c1 * x0 + c2 * x_t
                kl += normal_kl(true_mean, torch.log(beta_tilde[t]), model_mean, torch.log(model_var[t])).sum().item() / ln2_dims
    n = len(images)
    return prior / n, decoder / n, kl / n


@torch.no_grad()
def test_bits_per_dim_matches_a_slow_reference_loop(tiny_ddpm):
    # On the CPU: negative_log_likelihood draws the noise on the model's device, the reference on the CPU.
    images = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 256).to(torch.uint8)
    images[0, :, :4] = 0  # hit the open-ended edge bins of the decoder
    images[1, :, :4] = 255
    result = negative_log_likelihood(tiny_ddpm, images, batch_size=2, t_chunk=7, seed=3)
    prior, decoder, kl = reference_bits_per_dim(tiny_ddpm, images, seed=3)

    assert result["num_images"] == 3
    assert result["prior_L_T"] == pytest.approx(prior, rel=1e-4)
    assert result["decoder_L_0"] == pytest.approx(decoder, rel=1e-4)
    assert result["kl_sum"] == pytest.approx(kl, rel=1e-4)
    assert result["bits_per_dim"] == pytest.approx(prior + decoder + kl, rel=1e-4)
    assert all(math.isfinite(v) for v in result.values())
    # Noise is drawn per image, so neither the batch size nor the chunking changes the result.
    again = negative_log_likelihood(tiny_ddpm, images, batch_size=3, t_chunk=50, seed=3)
    assert again["bits_per_dim"] == pytest.approx(result["bits_per_dim"], rel=1e-6)


def run_eval(*argv: str) -> dict:
    return evaluate([*argv[:1], "--device", "cpu", *argv[1:]])


def test_nll_command_reports_the_breakdown(tmp_path, tiny_weights, synthetic_mnist, capsys):
    out = tmp_path / "nll.json"
    result = run_eval("nll", "--weights", str(tiny_weights), "--data", "mnist", "--data-path", str(synthetic_mnist),
                      "--limit", "2", "--json", str(out))
    assert json.loads(out.read_text()) == result
    assert result["num_images"] == 2 and result["split"] == "test"
    assert result["bits_per_dim"] == pytest.approx(result["prior_L_T"] + result["decoder_L_0"] + result["kl_sum"])
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and "prior L_T" in printed and "decoder L_0" in printed and "sum of KL" in printed


def test_samples_command_writes_a_grid(tmp_path, tiny_weights):
    out = tmp_path / "grid.png"
    result = run_eval("samples", "--weights", str(tiny_weights), "-n", "4", "--steps", "5", "--sampler", "ddim",
                      "--out", str(out))
    assert result["num"] == 4 and result["steps"] == 5
    with Image.open(out) as grid:
        assert grid.size == (2 + 2 * 30, 2 + 2 * 30)  # 2 x 2 images of 28 px with 2 px gaps


def test_speed_command_reports_images_per_second(tmp_path, tiny_weights):
    result = run_eval("speed", "--weights", str(tiny_weights), "--steps", "3", "--batch-size", "2", "--repeats", "2")
    assert result["images_per_s"] > 0 and result["batch_size"] == 2 and result["steps"] == 3



@pytest.mark.parametrize("command, extra, done", [
    ("samples", ("-n", "2"), "samples: 100%|"),
    ("speed", ("--batch-size", "1", "--repeats", "2"), "speed: 100%|"),  # warm-up step + 2 x 3 timed steps
])
def test_samples_and_speed_show_progress_on_stderr(tmp_path, tiny_weights, capsys, command, extra, done):
    argv = (command, "--weights", str(tiny_weights), "--steps", "3", "--sampler", "ddim", *extra)
    if command == "samples":
        argv += ("--out", str(tmp_path / "grid.png"))
    run_eval(*argv, "--progress")
    shown = capsys.readouterr().err
    assert done in shown and ("| 3/3 " if command == "samples" else "| 7/7 ") in shown, shown
    run_eval(*argv)  # stderr is not a terminal here: off by default
    run_eval(*argv, "--no-progress")
    assert "100%" not in capsys.readouterr().err

class FeaturesByPooling(torch.nn.Module):
    """Stands in for the Inception TorchScript file: same call, 12 features per image."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is the Inception file's format
def test_fid_command_with_a_torchscript_detector(tmp_path, tiny_weights, synthetic_mnist):
    detector = tmp_path / "detector.pt"
    torch.jit.save(torch.jit.script(FeaturesByPooling()), str(detector))
    stats = tmp_path / "ref.npz"
    argv = ("fid", "--weights", str(tiny_weights), "--inception", str(detector), "--data", "mnist",
            "--data-path", str(synthetic_mnist), "--num-samples", "6", "--batch-size", "3", "--steps", "2",
            "--sampler", "ddim", "--ref-stats", str(stats))
    first = run_eval(*argv)
    assert math.isfinite(first["fid"]) and first["fid"] > 0
    assert stats.is_file()
    # The second run reads the cached reference statistics; the same seed gives the same samples.
    assert run_eval(*argv, "--data-path", "/nonexistent.npz")["fid"] == pytest.approx(first["fid"])


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("inception, expected", [(None, INCEPTION_URL), ("missing.pt", "no such file"),
                                                 ("garbage.pt", "not a TorchScript file")])
def test_fid_without_usable_inception_weights_says_what_to_provide(tmp_path, tiny_weights, inception, expected):
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    argv = ["fid", "--weights", str(tiny_weights), "--num-samples", "2"]
    if inception:
        argv += ["--inception", str(tmp_path / inception)]
    with pytest.raises(SystemExit) as exit_info:
        run_eval(*argv)
    message = str(exit_info.value.code)
    assert message.startswith("ddpm-eval: ") and expected in message and "--inception" in message


@pytest.mark.parametrize("argv, expected", [
    (("samples", "--steps", "51"), "--steps must be between 1 and 50"),
    (("nll", "--data", "/nonexistent/folder"), "no such folder of images"),
])
def test_bad_options_are_clear_errors(tiny_weights, argv, expected):
    with pytest.raises(SystemExit, match=expected):
        run_eval(argv[0], "--weights", str(tiny_weights), *argv[1:])


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such weights file"):
        run_eval("speed", "--weights", str(tmp_path / "none.safetensors"))
