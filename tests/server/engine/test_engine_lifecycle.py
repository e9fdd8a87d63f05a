"""Requests that end early, queues that fill, steps that fail, engines that shut down."""

import asyncio
import json
import time

import pytest
import torch

from server.contract import (
    Done,
    EngineClosed,
    EngineConfig,
    Failed,
    Frame,
    GenerationFailed,
    GenerationSpec,
    NullObserver,
    Progress,
    Queued,
    QueueFull,
    RequestLimits,
    RequestState,
    Started,
    validate,
)
from server.engine import Engine
from server.engine.engine import MAX_RETRY_AFTER_S, retry_after_s
from server.engine.faults import OutOfMemoryError

from .conftest import assert_images_match, run, running_engine, submit, wait_until

QUICK = GenerationSpec(n=1, steps=3, sampler="ddim", seed=0)


async def failure_of(handle) -> Failed:
    with pytest.raises(GenerationFailed) as raised:
        await handle.result()
    return raised.value.failure


def test_events_arrive_in_order_and_end_with_done(tiny_ddpm):
    async def body():
        async with running_engine(tiny_ddpm) as engine:
            handle = submit(engine, GenerationSpec(n=2, steps=6, sampler="ddim", seed=1, preview_every=2))
            return [event async for event in handle.events()]

    events = run(body())
    assert isinstance(events[0], Queued) and events[0].position == 0
    assert isinstance(events[1], Started)
    assert isinstance(events[-1], Done) and len(events[-1].images) == 2
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == sorted(steps) and steps[-1] == 6
    frames = {(f.index, f.kind) for f in events if isinstance(f, Frame)}
    assert frames == {(i, kind) for i in range(2) for kind in ("x_t", "x0")}


def test_cancelling_frees_the_lanes_at_the_next_step(controlled_ddpm):
    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=4)) as engine:
            controlled_ddpm.unet.delay_s = 0.01
            handle = submit(engine, GenerationSpec(n=4, seed=1))
            await wait_until(lambda: engine.stats()["running_lanes"] == 4)
            assert handle.cancel()
            failure = await failure_of(handle)
            stats = engine.stats()
            assert engine.status(handle.id) is None and not engine.cancel(handle.id)
            controlled_ddpm.unet.delay_s = 0
            after = await submit(engine, QUICK).result()
            return failure, stats, after

    failure, stats, after = run(body())
    assert failure.code == "cancelled"
    assert (stats["running_lanes"], stats["running_requests"]) == (0, 0)
    assert len(after.images) == 1


def test_cancelling_a_queued_request_frees_its_queue_slots(controlled_ddpm):
    async def body():
        config = EngineConfig(max_batch=1, max_queue=4, max_images_per_request=4)
        async with running_engine(controlled_ddpm, config) as engine:
            controlled_ddpm.unet.gate.clear()
            running = submit(engine, QUICK)
            await wait_until(lambda: engine.stats()["running_lanes"] == 1)
            queued = submit(engine, GenerationSpec(n=4, steps=3, sampler="ddim"))
            assert engine.status(queued.id).queue_position == 0
            with pytest.raises(QueueFull):
                submit(engine, QUICK)
            engine.cancel(queued.id)  # takes effect at the next step boundary
            controlled_ddpm.unet.gate.set()
            assert (await failure_of(queued)).code == "cancelled"
            assert engine.stats()["queue_depth"] == 0
            refill = submit(engine, GenerationSpec(n=4, steps=3, sampler="ddim"))
            await running.result()
            await refill.result()

    run(body())


def test_a_full_queue_rejects_at_once_with_a_retry_hint(controlled_ddpm):
    async def body():
        config = EngineConfig(max_batch=1, max_queue=2, max_images_per_request=2)
        async with running_engine(controlled_ddpm, config) as engine:
            controlled_ddpm.unet.gate.clear()
            first = submit(engine, QUICK)
            await wait_until(lambda: engine.stats()["running_lanes"] == 1)
            waiting = submit(engine, GenerationSpec(n=2, steps=3, sampler="ddim"))
            began = time.monotonic()
            with pytest.raises(QueueFull) as raised:
                submit(engine, QUICK)
            elapsed = time.monotonic() - began
            controlled_ddpm.unet.gate.set()
            await first.result()
            await waiting.result()
            return raised.value, elapsed

    rejection, elapsed = run(body())
    assert elapsed < 0.1
    assert rejection.retry_after_s >= 1


def test_a_failing_step_fails_only_its_batch_and_the_engine_goes_on(controlled_ddpm, tiny_ddpm):
    unet = controlled_ddpm.unet

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=1)) as engine:
            failures = iter([RuntimeError("boom")])  # after start: its warm-up call would take it
            unet.fault = lambda batch_size: next(failures, None)
            unet.gate.clear()
            in_batch = submit(engine, QUICK)
            waiting = submit(engine, GenerationSpec(n=1, steps=3, sampler="ddim", seed=1))
            unet.gate.set()
            failure = await failure_of(in_batch)
            return failure, await waiting.result(), await submit(engine, QUICK).result()

    failure, waited, after = run(body())
    assert failure.code == "internal" and "boom" in failure.message
    assert_images_match(waited, tiny_ddpm.sample(1, steps=3, sampler="ddim", seed=1))
    assert len(after.images) == 1


def test_out_of_memory_halves_the_batch_and_retries_before_failing_anyone(controlled_ddpm, tiny_ddpm):
    unet = controlled_ddpm.unet
    spec = GenerationSpec(n=5, steps=4, seed=3)

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=8)) as engine:
            unet.fault = lambda batch_size: OutOfMemoryError("fake OOM") if batch_size > 2 else None
            done = await submit(engine, spec).result()
            return done, engine.stats()["batch_cap"]

    done, batch_cap = run(body())
    assert batch_cap == 2 and max(unet.batch_sizes) == 2
    assert_images_match(done, tiny_ddpm.sample(5, steps=4, seed=3))


def test_out_of_memory_at_batch_size_one_fails_with_its_own_code(controlled_ddpm):
    controlled_ddpm.unet.fault = lambda batch_size: OutOfMemoryError("fake OOM")

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=2)) as engine:
            return await failure_of(submit(engine, QUICK))

    assert run(body()).code == "out_of_memory"


def test_a_slow_preview_consumer_never_stalls_others(tiny_ddpm):
    async def body():
        config = EngineConfig(max_preview_fps=1000.0)
        async with running_engine(tiny_ddpm, config) as engine:
            ignored = submit(engine, GenerationSpec(n=2, steps=20, sampler="ddim", preview_every=1))
            watched = submit(engine, GenerationSpec(n=1, steps=20, sampler="ddim", preview_every=1))
            watched_events = [event async for event in watched.events()]
            await ignored.result()
            return [event async for event in ignored.events()], watched_events

    ignored_events, watched_events = run(body())
    assert isinstance(watched_events[-1], Done)
    # The unread request kept only its latest frame per image and kind; its Done is intact.
    frames = [e for e in ignored_events if isinstance(e, Frame)]
    assert len(frames) <= 4 and len(ignored_events[-1].images) == 2


def test_preview_frames_are_capped_per_second(tiny_ddpm):
    async def body():
        async with running_engine(tiny_ddpm, EngineConfig(max_preview_fps=0.001)) as engine:
            handle = submit(engine, GenerationSpec(n=1, steps=10, sampler="ddim", preview_every=1,
                                                  preview_kinds=("x0",)))
            return [event async for event in handle.events()]

    frames = [e for e in run(body()) if isinstance(e, Frame)]
    assert [(f.step, f.kind) for f in frames] == [(1, "x0")]


def test_a_request_past_its_deadline_fails_with_timeout(controlled_ddpm):
    controlled_ddpm.unet.delay_s = 0.05

    async def body():
        async with running_engine(controlled_ddpm) as engine:
            handle = submit(engine, GenerationSpec(n=1, seed=0, timeout_s=0.3))
            failure = await failure_of(handle)
            return failure, engine.stats()["running_lanes"]

    failure, running_lanes = run(body())
    assert failure.code == "timeout" and running_lanes == 0


def test_shutdown_finishes_running_work_and_fails_what_had_not_started(controlled_ddpm):
    async def body():
        engine_config = EngineConfig(max_batch=1, policy="sequential")
        async with running_engine(controlled_ddpm, engine_config) as engine:
            controlled_ddpm.unet.delay_s = 0.01
            running = submit(engine, GenerationSpec(n=1, steps=10, sampler="ddim"))
            await wait_until(lambda: engine.stats()["running_lanes"] == 1)
            queued = submit(engine, QUICK)
            await engine.shutdown(grace_s=60)
            assert not engine.ready
            with pytest.raises(EngineClosed):
                submit(engine, QUICK)
            return await running.result(), await failure_of(queued)

    done, failure = run(body())
    assert len(done.images) == 1
    assert failure.code == "shutdown"


def test_shutdown_past_its_grace_fails_running_work_with_shutdown(controlled_ddpm):
    controlled_ddpm.unet.delay_s = 0.05

    async def body():
        async with running_engine(controlled_ddpm) as engine:
            handle = submit(engine, GenerationSpec(n=2, seed=0))
            await wait_until(lambda: engine.stats()["running_lanes"] == 2)
            began = time.monotonic()
            await engine.shutdown(grace_s=0.2)
            return await failure_of(handle), time.monotonic() - began

    failure, elapsed = run(body())
    assert failure.code == "shutdown"
    assert elapsed < 5


def test_submit_takes_only_a_spec_validated_for_this_engine(tiny_ddpm):
    """The engine checks nothing itself: it accepts only what validate() proved for its limits."""
    async def body():
        async with running_engine(tiny_ddpm) as engine:
            with pytest.raises(TypeError, match="ValidSpec"):
                engine.submit(QUICK)
            other_model = RequestLimits(num_timesteps=1000)
            with pytest.raises(TypeError, match="ValidSpec"):
                engine.submit(validate(QUICK, other_model))
            return engine.stats()["queue_depth"]

    assert run(body()) == 0


def test_status_follows_a_request_and_forgets_it_when_done(controlled_ddpm):
    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=1)) as engine:
            controlled_ddpm.unet.gate.clear()
            first = submit(engine, GenerationSpec(n=1, steps=3, sampler="ddim", owner="alice"))
            await wait_until(lambda: engine.stats()["running_lanes"] == 1)
            second = submit(engine, QUICK)
            statuses = engine.status(first.id), engine.status(second.id)
            controlled_ddpm.unet.gate.set()
            await first.result()
            await second.result()
            return statuses, engine.status(first.id)

    (running, queued), forgotten = run(body())
    assert (running.state, running.total, running.owner, running.queue_position) == (
        RequestState.RUNNING, 3, "alice", None)
    assert (queued.state, queued.queue_position, queued.step) == (RequestState.QUEUED, 0, 0)
    assert forgotten is None


def test_submit_before_start_is_refused(tiny_ddpm):
    with pytest.raises(EngineClosed):
        submit(Engine(tiny_ddpm), QUICK)


def test_model_info_is_json_and_describes_the_model(tiny_ddpm):
    info = Engine(tiny_ddpm, EngineConfig(max_batch=8, max_images_per_request=4)).model_info()
    json.loads(info.model_dump_json())
    assert info.image_shape == (1, 28, 28) and info.num_timesteps == 50
    assert info.samplers == ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "unipc"] and info.max_batch == 8
    assert info.limits == RequestLimits(num_timesteps=50, max_images_per_request=4, image_shape=(1, 28, 28))
    assert info.num_parameters == tiny_ddpm.num_parameters()


class RecordingObserver:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


def test_the_observer_hears_about_every_stage(tiny_ddpm):
    observer = RecordingObserver()

    async def body():
        async with running_engine(tiny_ddpm, observer=observer) as engine:
            await submit(engine, GenerationSpec(n=2, steps=4, sampler="ddim", preview_every=2)).result()

    run(body())
    calls = [(name, args) for name, args in observer.calls if name != "on_load"]
    names = [name for name, _ in calls]
    assert calls[0] == ("on_submit", (2,))
    assert {"on_start", "on_step", "on_first_frame"} <= set(names)
    assert ("on_finish", "succeeded") in [(name, args[0]) for name, args in observer.calls if name == "on_finish"]
    batch_sizes = [args[0] for name, args in observer.calls if name == "on_step"]
    assert batch_sizes == [2, 2, 2, 2]


def test_the_engine_thread_runs_torch_with_its_own_thread_count(tiny_ddpm):
    """Other threads keep one torch thread; the engine thread sets the count it was given."""
    seen = []

    class Recorder(NullObserver):
        def on_step(self, batch_size, step_s):
            seen.append(torch.get_num_threads())

    async def run():
        engine = Engine(tiny_ddpm, EngineConfig(torch_threads=3), Recorder())
        await engine.start()
        await submit(engine, GenerationSpec(n=1, steps=2, sampler="ddim", seed=0)).result()
        await engine.shutdown()

    before = torch.get_num_threads()
    asyncio.run(run())
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before


def test_retry_after_counts_the_steps_actually_ahead():
    # 4 running lanes with 10..40 steps left, 50 ms steps: one more image fits after 0.5 s -> 1 s.
    assert retry_after_s(1, [40, 10, 30, 20], [], batch_cap=4, step_s=0.05) == 1.0
    assert retry_after_s(3, [40, 10, 30, 20], [], batch_cap=4, step_s=0.05) == pytest.approx(1.5)
    # past the running lanes: each further batch of 4 waits one lifetime of the waiting lanes (50 steps)
    assert retry_after_s(9, [40, 10, 30, 20], [50] * 16, batch_cap=4, step_s=0.05) == pytest.approx((40 + 2 * 50) * 0.05)
    assert retry_after_s(10_000, [1000], [1000] * 256, batch_cap=1, step_s=1.0) == MAX_RETRY_AFTER_S


def test_a_fresh_engine_says_when_to_retry_from_the_steps_ahead(controlled_ddpm):
    """A fresh engine used to assume T steps per image at 0.1 s each: 1000-step models told
    clients of 50-step requests to wait minutes."""
    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=1, max_queue=2,
                                                                max_images_per_request=2)) as engine:
            controlled_ddpm.unet.delay_s = 0.01
            running = submit(engine, GenerationSpec(n=1, steps=20, sampler="ddim"))
            await wait_until(lambda: engine.stats()["running_lanes"] == 1)
            waiting = submit(engine, GenerationSpec(n=2, steps=20, sampler="ddim"))
            with pytest.raises(QueueFull) as refused:
                submit(engine, QUICK)
            await running.result(), await waiting.result()
            return refused.value.retry_after_s

    assert run(body()) <= 2.0


def test_load_gauges_return_to_zero_when_everything_is_cancelled(controlled_ddpm):
    loads = []

    class Recorder(NullObserver):
        def on_load(self, running_lanes, queue_depth):
            loads.append((running_lanes, queue_depth))

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=2), observer=Recorder()) as engine:
            controlled_ddpm.unet.delay_s = 0.01
            handles = [submit(engine, GenerationSpec(n=2, steps=40, sampler="ddim")) for _ in range(3)]
            await wait_until(lambda: (2, 4) in loads)
            for handle in handles:
                handle.cancel()
            await wait_until(lambda: loads[-1] == (0, 0))

    run(body())
