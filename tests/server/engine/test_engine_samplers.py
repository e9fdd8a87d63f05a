"""Lanes of every sampler, multistep ones with their history, share the engine's batches and
compute the images DDPM.sample computes; a retried step reads the same noise again."""

from __future__ import annotations

import torch

from model.samplers import SAMPLERS
from server.contract import EngineConfig, GenerationSpec, Progress, RequestLimits, validate
from server.engine.faults import OutOfMemoryError
from server.engine.request import Request
from server.engine.runner import Runner

from .conftest import assert_images_match, run, running_engine, submit

MIXED = {
    "dpmpp": GenerationSpec(n=2, steps=12, sampler="dpmpp_2m", seed=1),
    "ddpm": GenerationSpec(n=1, steps=9, seed=2),
    "sde": GenerationSpec(n=2, steps=7, sampler="dpmpp_2m_sde", seed=3),
    "unipc": GenerationSpec(n=2, steps=10, sampler="unipc", seed=4),
    "ddim": GenerationSpec(n=1, steps=6, sampler="ddim", eta=0.5, seed=5),
}


def reference(ddpm, spec: GenerationSpec):
    return ddpm.sample(spec.n, steps=spec.steps, sampler=spec.sampler, eta=spec.eta, seed=spec.seed)


def test_lanes_of_every_sampler_join_and_leave_shared_batches_without_changing_images(tiny_ddpm):
    """The first request is under way when the others arrive; a cap of 4 splits requests over
    admissions, so every lane shares batches of changing members at different steps."""
    assert set(spec.sampler for spec in MIXED.values()) == set(SAMPLERS)

    async def body():
        async with running_engine(tiny_ddpm, EngineConfig(max_batch=4)) as engine:
            first = submit(engine, MIXED["dpmpp"])
            async for event in first.events():
                if isinstance(event, Progress) and event.step >= 3:
                    break
            later = {name: submit(engine, spec) for name, spec in MIXED.items() if name != "dpmpp"}
            return {"dpmpp": await first.result(), **{name: await h.result() for name, h in later.items()}}

    results = run(body())
    for name, spec in MIXED.items():
        assert_images_match(results[name], reference(tiny_ddpm, spec))


def test_a_step_retried_after_running_out_of_memory_computes_the_same_images(controlled_ddpm, tiny_ddpm):
    """Two out-of-memory failures halve the batch; lanes step at other times than planned, and
    each stochastic lane still reads its own noise for each of its steps."""
    specs = [MIXED["sde"], MIXED["ddpm"], MIXED["unipc"]]
    failures = iter([OutOfMemoryError("fake OOM"), None, None, OutOfMemoryError("fake OOM")])

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=8)) as engine:
            controlled_ddpm.unet.fault = lambda batch_size: next(failures, None) if batch_size > 1 else None
            handles = [submit(engine, spec) for spec in specs]
            return [await handle.result() for handle in handles]

    results = run(body())
    assert next(failures, "all raised") == "all raised"
    for spec, done in zip(specs, results, strict=True):
        assert_images_match(done, reference(tiny_ddpm, spec))


def test_the_runner_step_can_be_repeated_until_committed(tiny_ddpm):
    """What the engine's retry relies on: a step leaves its lanes as they were (same noise, same
    history) until lane.advance commits it."""
    runner = Runner(tiny_ddpm)
    lanes = admitted_lanes(runner, MIXED.values())
    with torch.inference_mode():
        for _ in range(3):  # committed steps, so that multistep lanes hold history
            x_next, _ = runner.step(lanes)
            for lane, x in zip(lanes, x_next, strict=True):
                lane.advance(x)
        first = runner.step(lanes)
        again = runner.step(lanes)
    for first_rows, again_rows in zip(first, again, strict=True):  # x_next, then x0_hat
        assert all(torch.equal(a, b) for a, b in zip(first_rows, again_rows, strict=True))


def admitted_lanes(runner: Runner, specs) -> list:
    limits = RequestLimits(runner.num_timesteps, 16)
    lanes = []
    for given in specs:
        spec = validate(given, limits)
        request = Request("r", spec, runner.plan(spec.sampler, spec.steps, spec.eta), 60.0, channel=None)
        lanes += request.admit_lanes(spec.n, runner.ddpm.diffusion, runner.image_shape, runner.device)
    return lanes
