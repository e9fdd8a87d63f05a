"""The sample-quality score: its classifier trains and caches, its figures on known inputs, and
`ddpm-eval score` end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from model import quality
from model.evaluate import evaluate
from model.fid import feature_statistics
from model.quality import (DigitClassifier, Scorer, classify, load_labelled_mnist, load_or_train_scorer,
                           train_classifier)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bars(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [count, 28, 28] images of one bar at a random place: label 0 horizontal, 1 vertical."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 2, size=count).astype(np.uint8)
    for image, label, (a, b) in zip(images, labels, rng.integers(4, 20, size=(count, 2)), strict=True):
        if label == 0:
            image[a : a + 3, b - 2 : b + 8] = 255
        else:
            image[a - 2 : a + 8, b : b + 3] = 255
    return images, labels


@pytest.fixture(scope="module")
def labelled_bars(tmp_path_factory):
    """An MNIST-format npz with labels: 320 training images, 64 test images."""
    rng = np.random.default_rng(0)
    (x_train, y_train), (x_test, y_test) = bars(320, rng), bars(64, rng)
    path = tmp_path_factory.mktemp("data") / "bars.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def as_images(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).unsqueeze(1)


def test_the_classifier_learns_in_one_epoch():
    rng = np.random.default_rng(1)
    (x_train, y_train), (x_test, y_test) = bars(640, rng), bars(64, rng)
    classifier = train_classifier(as_images(x_train), torch.from_numpy(y_train).long(), epochs=1, batch_size=16)
    predicted = classify(classifier, as_images(x_test))[0].argmax(dim=1)
    assert (predicted == torch.from_numpy(y_test).long()).float().mean() >= 0.9


def test_the_scorer_is_trained_once_then_read_from_the_cache_keyed_by_content(tmp_path, labelled_bars, monkeypatch):
    announced = []
    first = load_or_train_scorer(labelled_bars, tmp_path / "cache", epochs=1, on_training=announced.append)
    assert not first.info["cached"] and announced == [Path(first.info["cache"])]
    assert 0.0 <= first.info["test_accuracy"] <= 1.0 and first.info["train_images"] == 320
    assert first.info["train_seconds"] > 0 and first.reference_mu.shape == (128,)

    monkeypatch.setattr(quality, "train_classifier", lambda *a, **k: pytest.fail("trained again"))
    moved = shutil.copy(labelled_bars, tmp_path / "same-content.npz")
    again = load_or_train_scorer(moved, tmp_path / "cache", epochs=1)
    assert again.info["cached"] and again.info["cache"] == first.info["cache"]
    assert again.info["test_accuracy"] == first.info["test_accuracy"]
    images = as_images(np.load(labelled_bars)["x_test"])
    assert again.score(images) == first.score(images)


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, labelled_bars):
    first = load_or_train_scorer(labelled_bars, tmp_path, epochs=1)
    Path(first.info["cache"]).write_bytes(b"truncated")
    assert not load_or_train_scorer(labelled_bars, tmp_path, epochs=1).info["cached"]


def test_the_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "mine"))
    assert quality.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DDPM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert quality.default_cache_dir() == tmp_path / "xdg" / "ddpm-serve"


def test_missing_labels_are_a_clear_error(tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x_train=np.zeros((4, 28, 28), np.uint8), x_test=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(model.data.DatasetError, match="no y_train labels"):
        load_or_train_scorer(path, tmp_path / "cache")


def test_a_thousand_real_digits_train_a_classifier_far_above_chance(mnist_path):
    images, labels = load_labelled_mnist(mnist_path, "train", 1000)
    classifier = train_classifier(images, labels, epochs=1, batch_size=32)
    test_images, test_labels = load_labelled_mnist(mnist_path, "test", 500)
    predicted = classify(classifier, test_images)[0].argmax(dim=1)
    # 32 Adam steps reach ~0.77 (chance: 0.1); the full recipe, two epochs of 60k, 98.9%.
    assert (predicted == test_labels).float().mean() > 0.5
    assert predicted.unique().numel() == 10


def scorer_with(head_bias: torch.Tensor, images: torch.Tensor) -> Scorer:
    """A random-feature classifier whose head outputs `head_bias` only, referenced to `images`' features."""
    torch.manual_seed(0)
    classifier = DigitClassifier().eval()
    with torch.no_grad():
        classifier.head.weight.zero_()
        classifier.head.bias.copy_(head_bias)
    mu, sigma = feature_statistics(classify(classifier, images)[1])
    return Scorer(classifier, mu, sigma, {})


def test_identical_sets_are_at_frechet_distance_zero_and_others_are_not():
    images = as_images(bars(64, np.random.default_rng(2))[0])
    scorer = scorer_with(torch.zeros(10), images)
    assert scorer.score(images)["frechet"] == pytest.approx(0.0, abs=1e-6)
    other = as_images(bars(64, np.random.default_rng(3))[0] // 2)
    assert scorer.score(other)["frechet"] > 1e-3


def test_confident_share_bounds_and_class_counts():
    images = as_images(bars(20, np.random.default_rng(4))[0])
    undecided = scorer_with(torch.zeros(10), images).score(images)  # p = 0.1 for every class
    assert undecided["confident_share"] == 0.0 and undecided["classes"] == 0 and undecided["class_counts"] == [0] * 10
    certain = scorer_with(10.0 * torch.nn.functional.one_hot(torch.tensor(3), 10).float(), images).score(images)
    assert certain["confident_share"] == 1.0 and certain["classes"] == 1
    assert certain["class_counts"] == [0, 0, 0, 20, 0, 0, 0, 0, 0, 0] and certain["n"] == 20


def test_the_reference_averages_each_figure_over_disjoint_random_sets_of_n():
    images = as_images(bars(70, np.random.default_rng(5))[0])
    scorer = scorer_with(torch.zeros(10), images)
    shuffled = images[torch.randperm(70, generator=torch.Generator().manual_seed(7))]
    sets = [scorer.score(shuffled[start : start + 20]) for start in (0, 20, 40)]  # 10 images are left out
    mean = scorer.mean_score(images, 20, seed=7)
    assert mean["n"] == 20 and mean["sets"] == 3 and mean["classes"] == 0.0
    assert mean["frechet"] == pytest.approx(np.mean([s["frechet"] for s in sets]))
    assert mean["frechet_std"] == pytest.approx(np.std([s["frechet"] for s in sets], ddof=1))
    whole = scorer.mean_score(images, 70)
    assert whole["sets"] == 1 and whole["frechet_std"] is None and whole["frechet"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="sets of 2 to 70 images"):
        scorer.mean_score(images, 71)


def run_score(*argv: str) -> dict:
    return evaluate(["score", "--device", "cpu", *argv])


def test_score_command_end_to_end(tmp_path, tiny_weights, labelled_bars, capsys):
    out = tmp_path / "score.json"
    argv = ("--weights", str(tiny_weights), "--data-path", str(labelled_bars), "--cache-dir", str(tmp_path),
            "--sampler", "ddim", "--steps", "3", "-n", "6", "--batch-size", "4", "--seed", "1")
    result = run_score(*argv, "--json", str(out))
    assert json.loads(out.read_text()) == result
    assert result["command"] == "score" and result["steps"] == 3 and not result["classifier"]["cached"]
    for name in ("samples", "real"):
        assert result[name]["n"] == 6 and 0.0 <= result[name]["confident_share"] <= 1.0
        assert sum(result[name]["class_counts"]) <= 6 and result[name]["frechet"] >= 0.0
    assert result["real"]["sets"] == 10 and result["real"]["frechet_std"] > 0  # 64 test images: 10 sets of 6
    captured = capsys.readouterr()
    assert "training the score's MNIST classifier" in captured.err
    assert f"score of 6 samples (ddim, 3 steps, {result['dtype']}, seed 1" in captured.out
    assert "real: the mean over 10 disjoint random sets of 6 test images (Frechet spread" in captured.out

    again = run_score(*argv)
    assert again["classifier"]["cached"] and again["samples"] == result["samples"]  # same seed, same images


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    config = model.preset("tiny")
    config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=3, out_channels=3, image_size=32))
    path = tmp_path_factory.mktemp("weights") / "rgb.safetensors"
    model.save(model.DDPM(model.UNet(config.unet), config), path)
    return path


@pytest.mark.parametrize("extra, expected", [
    (("--data", "cifar10"), "score trains its classifier on MNIST"),
    (("-n", "1"), "-n must be at least 2"),
    (("-n", "65"), "-n 65 is more than the 64 test images"),
    (("--steps", "51"), "--steps must be between 1 and 50"),
])
def test_bad_score_options_are_clear_errors(tmp_path, tiny_weights, labelled_bars, extra, expected):
    with pytest.raises(SystemExit, match=expected):
        run_score("--weights", str(tiny_weights), "--data-path", str(labelled_bars), "--cache-dir", str(tmp_path), *extra)


def test_a_model_that_is_not_mnist_shaped_is_a_clear_error(tmp_path, rgb_weights):
    with pytest.raises(SystemExit, match=r"MNIST-like models \(1x28x28 images\).*3x32x32.*ddpm-eval fid"):
        run_score("--weights", str(rgb_weights), "--cache-dir", str(tmp_path))
