"""The boundary between the API and engines: torch-free, one validation, one source per list,
and every engine (real, fake) true to the EngineClient Protocol."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing

import pytest

from model.samplers import SAMPLERS
from server.contract import (
    FRAME_KINDS,
    MAX_SEED,
    SAMPLER_NAMES,
    EngineClient,
    EngineConfig,
    GenerationSpec,
    InvalidSpec,
    RequestHandle,
    RequestLimits,
    ValidSpec,
    validate,
)
from server.engine import Engine
from server.contract.channel import ChannelHandle
from server.settings import Settings
from tests.server.api.fake_engine import FakeEngine, FakeHandle

LIMITS = RequestLimits(num_timesteps=50, max_images_per_request=16)


def test_the_api_and_the_app_load_without_torch():
    code = ("import sys, server.api, server.app, server.cli, server.client, server.contract; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'model')))")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("spec, field, message", [
    (GenerationSpec(n=0), "n", "n must be between 1 and 16"),
    (GenerationSpec(n=17), "n", "n must be between 1 and 16"),
    (GenerationSpec(n=True), "n", "n must be an integer"),
    (GenerationSpec(steps=51), "steps", "steps must be between 1 and 50 (the model's T)"),
    (GenerationSpec(steps=0), "steps", "steps must be between"),
    (GenerationSpec(sampler="euler"), "sampler", "sampler must be one of"),
    (GenerationSpec(sampler="ddim", eta=-1.0), "eta", "eta must be between 0 and 1"),
    (GenerationSpec(sampler="ddim", eta=float("nan")), "eta", "eta must be a finite number"),
    (GenerationSpec(eta=0.5), "eta", "ddim sampler only"),
    (GenerationSpec(seed=-1), "seed", f"seed must be between 0 and {MAX_SEED}"),
    (GenerationSpec(seed=MAX_SEED + 1), "seed", "seed must be between"),
    (GenerationSpec(preview_every=-1), "preview_every", "preview_every must be >= 0"),
    (GenerationSpec(preview_kinds=("noise",)), "preview_kinds", "preview_kinds must be"),
    (GenerationSpec(preview_kinds=()), "preview_kinds", "non-empty"),
    (GenerationSpec(timeout_s=0), "timeout_s", "timeout_s must be > 0"),
])
def test_validate_names_the_field_and_its_range(spec, field, message):
    with pytest.raises(InvalidSpec) as raised:
        validate(spec, LIMITS)
    assert raised.value.field == field and message in str(raised.value)


def test_validate_resolves_steps_and_seed_and_nothing_else_makes_a_valid_spec():
    valid = validate(GenerationSpec(n=2, preview_kinds=("x0", "x0")), LIMITS)
    assert valid.steps == 50 and 0 <= valid.seed <= MAX_SEED and valid.preview_kinds == ("x0",)
    assert validate(GenerationSpec(seed=MAX_SEED, steps=1), LIMITS).seed == MAX_SEED
    fields = {name: getattr(valid, name) for name in ValidSpec.__dataclass_fields__ if name != "_proof"}
    with pytest.raises(TypeError, match="validate"):
        ValidSpec(**fields)


def test_each_list_has_one_source():
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert FRAME_KINDS == ("x_t", "x0")
    engine_defaults, settings = EngineConfig(), Settings()
    assert settings.engine_config() == EngineConfig(torch_threads=None)
    assert (settings.max_images_per_request, settings.request_timeout_s) == (
        engine_defaults.max_images_per_request, engine_defaults.default_timeout_s)


def protocol_members(protocol: type) -> dict[str, object]:
    members = {name: value for name, value in vars(protocol).items() if not name.startswith("_")}
    members.update({name: None for name in typing.get_type_hints(protocol)})
    return members


def assert_implements(implementation: type, protocol: type, instance: object) -> None:
    """Every member of `protocol`, with the same parameters and the same sync/async kind."""
    for name, member in protocol_members(protocol).items():
        assert hasattr(instance, name), f"{implementation.__name__} lacks {name}"
        if not inspect.isfunction(member):  # an attribute or a property: having it is the contract
            continue
        ours = getattr(implementation, name)
        expected, got = inspect.signature(member), inspect.signature(ours)
        assert list(got.parameters) == list(expected.parameters), f"{implementation.__name__}.{name}{got}"
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(member), name


def test_the_engine_and_the_fake_implement_the_engine_client(tiny_ddpm):
    assert_implements(Engine, EngineClient, Engine(tiny_ddpm))
    assert_implements(FakeEngine, EngineClient, FakeEngine(observer=None))


def test_their_handles_implement_the_request_handle():
    spec = validate(GenerationSpec(), LIMITS)
    assert_implements(ChannelHandle, RequestHandle, ChannelHandle("id", spec.seed, spec, None, None))
    assert_implements(FakeHandle, RequestHandle, FakeHandle("id", spec.seed, spec))
