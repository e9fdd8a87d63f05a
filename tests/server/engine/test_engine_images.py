"""The engine computes the images DDPM.sample computes, whatever shares their batches."""

import pytest

from model.samplers import image_seed
from server.contract import EngineConfig, GenerationSpec, Progress

from .conftest import assert_images_match, run, running_engine, submit


def test_a_request_alone_matches_ddpm_sample(tiny_ddpm):
    async def body():
        async with running_engine(tiny_ddpm) as engine:
            handle = submit(engine, GenerationSpec(n=2, seed=11))
            return handle, await handle.result()

    handle, done = run(body())
    assert done.seed == handle.seed == 11
    assert_images_match(done, tiny_ddpm.sample(2, seed=11))


def test_the_engine_picks_and_reports_a_seed_when_none_is_given(tiny_ddpm):
    async def body():
        async with running_engine(tiny_ddpm) as engine:
            handle = submit(engine, GenerationSpec(n=1, steps=5, sampler="ddim"))
            return handle, await handle.result()

    handle, done = run(body())
    assert done.seed == handle.seed
    assert_images_match(done, tiny_ddpm.sample(1, steps=5, sampler="ddim", seed=handle.seed))


def test_lanes_at_different_steps_and_samplers_share_batches_without_changing_images(tiny_ddpm):
    """A (50-step ddpm) is well under way when B (10-step ddim, eta 0.5) and C (respaced
    25-step ddpm, split over two admissions by the cap of 4) join its batches."""
    specs = {
        "A": GenerationSpec(n=2, seed=1),
        "B": GenerationSpec(n=1, steps=10, sampler="ddim", eta=0.5, seed=2),
        "C": GenerationSpec(n=2, steps=25, seed=3),
    }

    async def body():
        async with running_engine(tiny_ddpm, EngineConfig(max_batch=4)) as engine:
            first = submit(engine, specs["A"])
            events = first.events()
            async for event in events:
                if isinstance(event, Progress) and event.step >= 10:
                    break
            later = {name: submit(engine, specs[name]) for name in ("B", "C")}
            return {"A": await first.result(), **{name: await h.result() for name, h in later.items()}}

    results = run(body())
    for name, spec in specs.items():
        reference = tiny_ddpm.sample(spec.n, steps=spec.steps, sampler=spec.sampler, eta=spec.eta, seed=spec.seed)
        assert_images_match(results[name], reference)


@pytest.mark.parametrize("policy", ["static", "sequential"])
def test_every_policy_computes_the_same_images(tiny_ddpm, policy):
    specs = [GenerationSpec(n=3, steps=10, sampler="ddim", seed=4), GenerationSpec(n=2, steps=5, seed=5)]

    async def body():
        async with running_engine(tiny_ddpm, EngineConfig(max_batch=4, policy=policy)) as engine:
            handles = [submit(engine, spec) for spec in specs]
            return [await handle.result() for handle in handles]

    for spec, done in zip(specs, run(body()), strict=True):
        assert_images_match(done, tiny_ddpm.sample(spec.n, steps=spec.steps, sampler=spec.sampler, seed=spec.seed))


def test_image_seeds_are_reported_per_image(tiny_ddpm):
    async def body():
        async with running_engine(tiny_ddpm) as engine:
            return await submit(engine, GenerationSpec(n=3, steps=2, sampler="ddim", seed=9)).result()

    assert [image.seed for image in run(body()).images] == [image_seed(9, i) for i in range(3)]
