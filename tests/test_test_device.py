"""DDPM_TEST_DEVICE (tests/conftest.py): which device the model and engine suites run on, and
a clear error at session start for one that cannot be had. Runs on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import parse_test_device

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", [None, "", "  ", "cpu", "cpu:0"])
def test_unset_empty_or_cpu_means_the_cpu(value):
    assert parse_test_device(value) == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "mps", "meta"])
def test_a_value_that_is_not_cpu_or_cuda_is_a_clear_error(value):
    with pytest.raises(ValueError, match=f"DDPM_TEST_DEVICE='{value}' is not a device the tests run on: use cpu, "
                                         "cuda or cuda:N"):
        parse_test_device(value)


def test_cuda_without_a_cuda_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="DDPM_TEST_DEVICE=cuda asks for CUDA, but this torch .* sees no CUDA device"):
        parse_test_device("cuda")


@pytest.mark.parametrize("value, expected", [("cuda", "cuda:0"), ("cuda:0", "cuda:0"), ("cuda:1", "cuda:1")])
def test_cuda_names_one_gpu(monkeypatch, value, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_test_device(value) == torch.device(expected)


def test_a_gpu_past_the_visible_ones_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="DDPM_TEST_DEVICE=cuda:2 needs GPU 2, but 2 are visible"):
        parse_test_device("cuda:2")


def test_a_device_that_cannot_be_had_stops_the_session_before_any_test():
    env = {**os.environ, "DDPM_TEST_DEVICE": "gpu"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_test_device.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "DDPM_TEST_DEVICE='gpu' is not a device the tests run on" in done.stderr
    assert "passed" not in done.stdout and "skipped" not in done.stdout
