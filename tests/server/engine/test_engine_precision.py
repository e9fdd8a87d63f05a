"""A U-Net in bfloat16 behind the engine: reported by model_info, and the same images alone or
sharing batches with other requests (the engine and samplers stay float32)."""

import pytest
import torch

import model
from server.contract import EngineConfig, GenerationSpec

from .conftest import assert_images_match, run, running_engine, submit


@pytest.fixture(scope="module")
def bf16_ddpm(tiny_weights, test_device) -> model.DDPM:
    return model.load(tiny_weights, device=test_device, dtype="bfloat16")


def test_model_info_reports_the_dtype(bf16_ddpm, tiny_ddpm):
    from server.engine import Engine

    assert Engine(bf16_ddpm).model_info().dtype == "bfloat16"
    assert Engine(tiny_ddpm).model_info().dtype == "float32"


def test_requests_sharing_batches_in_bf16_get_the_images_they_get_alone(bf16_ddpm):
    specs = [GenerationSpec(n=2, steps=6, seed=1), GenerationSpec(n=1, steps=4, sampler="ddim", seed=2)]

    async def body():
        async with running_engine(bf16_ddpm, EngineConfig(max_batch=4)) as engine:
            handles = [submit(engine, spec) for spec in specs]
            return [await handle.result() for handle in handles]

    for spec, done in zip(specs, run(body()), strict=True):
        alone = torch.cat([bf16_ddpm.sample(1, steps=spec.steps, sampler=spec.sampler, seed=spec.seed, first_index=i)
                           for i in range(spec.n)])
        assert_images_match(done, alone)
