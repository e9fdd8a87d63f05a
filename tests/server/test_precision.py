"""--dtype / DDPM_DTYPE: accepted, refused with a clear message, passed to model.load, reported
by /models."""

from __future__ import annotations

import typing

import pytest
import torch

from model.precision import DTYPE_CHOICES
from server import cli
from server.app import load_model
from server.settings import Settings
from tests.server.api.conftest import serve_fake


def test_the_settings_offer_the_dtypes_model_load_takes():
    # server/settings.py stays torch-free, so it spells the names out itself.
    assert typing.get_args(Settings.model_fields["dtype"].annotation) == DTYPE_CHOICES
    assert Settings().dtype == "auto"


def test_dtype_from_the_environment_and_from_the_flag(monkeypatch):
    monkeypatch.setenv("DDPM_DTYPE", "float16")
    assert Settings().dtype == "float16"
    assert cli.settings_from(["--dtype", "bfloat16"]).dtype == "bfloat16"


def test_a_bad_dtype_flag_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.settings_from(["--dtype", "bf16"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    # Python 3.12 quotes the choices, earlier releases do not.
    assert "ddpm-serve: error: argument --dtype: invalid choice: 'bf16' (choose from " in err
    assert all(name in err.rsplit("choose from", 1)[1] for name in DTYPE_CHOICES)


def test_a_bad_dtype_in_the_environment_exits_2_with_the_choices(monkeypatch, capsys):
    monkeypatch.setenv("DDPM_DTYPE", "half")
    assert cli.main(["--weights", "x"]) == 2
    assert capsys.readouterr().err == (
        "ddpm-serve: error: dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'\n")


def test_the_server_loads_the_weights_in_the_dtype_asked(tiny_weights):
    ddpm = load_model(Settings(weights=tiny_weights, device="cpu", dtype="bfloat16"))
    assert ddpm.dtype == torch.bfloat16


def test_models_reports_the_dtype():
    with serve_fake() as (client, _):
        assert client.get("/models").json()["dtype"] == "float32"
