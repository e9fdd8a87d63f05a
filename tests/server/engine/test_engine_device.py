"""What a device can do to the engine: run out of memory anywhere, break for good, warm up, take time.

Faults are injected on the CPU (a U-Net or an admission that raises); what needs CUDA is marked gpu."""

import time

import pytest
import torch

import server.engine.engine as engine_module
import server.engine.faults as faults
from server.contract import EngineConfig, EngineError, Failed, GenerationFailed, GenerationSpec
from server.engine.engine import serve_in_full_fp32, warm_up_batch_sizes
from server.engine.faults import OutOfMemoryError, device_is_broken, out_of_memory_type
from server.engine.request import Request
from server.engine.timing import StepTimer

from .conftest import assert_images_match, run, running_engine, submit, wait_until

QUICK = GenerationSpec(n=1, steps=3, sampler="ddim", seed=0)
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


async def failure_of(handle) -> Failed:
    with pytest.raises(GenerationFailed) as raised:
        await handle.result()
    return raised.value.failure


def test_the_out_of_memory_type_exists_on_torch_2_3(monkeypatch):
    """torch.OutOfMemoryError is missing from torch 2.3, the oldest pyproject admits."""
    monkeypatch.delattr(torch, "OutOfMemoryError")
    assert out_of_memory_type() is torch.cuda.OutOfMemoryError


def test_a_failing_step_on_a_torch_without_OutOfMemoryError_fails_only_its_batch(controlled_ddpm, monkeypatch):
    """`except torch.OutOfMemoryError` raised AttributeError there, and the engine loop died."""
    monkeypatch.delattr(torch, "OutOfMemoryError")
    unet = controlled_ddpm.unet

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=1)) as engine:
            failures = iter([RuntimeError("boom")])
            unet.fault = lambda batch_size: next(failures, None)
            failure = await failure_of(submit(engine, QUICK))
            return failure, await submit(engine, QUICK).result()

    failure, after = run(body())
    assert failure.code == "internal" and len(after.images) == 1


def fail_admissions_of(monkeypatch, seeds: set[int], error: Exception) -> None:
    """Admitting lanes of requests with these seeds raises `error` (where x_T is made), once each."""
    admit_lanes = Request.admit_lanes

    def failing(request, *args):
        if request.seed in seeds:
            seeds.discard(request.seed)
            raise error
        return admit_lanes(request, *args)

    monkeypatch.setattr(Request, "admit_lanes", failing)


def test_out_of_memory_making_x_T_with_nothing_running_fails_that_request_only(tiny_ddpm, monkeypatch):
    fail_admissions_of(monkeypatch, {7}, OutOfMemoryError("fake OOM"))

    async def body():
        async with running_engine(tiny_ddpm) as engine:
            failure = await failure_of(submit(engine, GenerationSpec(n=1, steps=3, sampler="ddim", seed=7)))
            return failure, await submit(engine, QUICK).result(), engine.ready

    failure, after, ready = run(body())
    assert failure.code == "out_of_memory" and len(after.images) == 1 and ready


def test_out_of_memory_making_x_T_beside_running_lanes_waits_for_room(controlled_ddpm, tiny_ddpm, monkeypatch):
    fail_admissions_of(monkeypatch, {8}, OutOfMemoryError("fake OOM"))
    monkeypatch.setattr("server.engine.scheduler.REGROW_AFTER_STEPS", 2)
    first = GenerationSpec(n=2, steps=6, sampler="ddim", seed=1)
    second = GenerationSpec(n=2, steps=4, sampler="ddim", seed=8)

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=4)) as engine:
            controlled_ddpm.unet.delay_s = 0.01
            running = submit(engine, first)
            await wait_until(lambda: engine.stats()["running_lanes"] == 2)
            waiting = submit(engine, second)
            return await running.result(), await waiting.result(), engine.stats()["batch_cap"]

    done_first, done_second, batch_cap = run(body())
    assert_images_match(done_first, tiny_ddpm.sample(2, steps=6, sampler="ddim", seed=1))
    assert_images_match(done_second, tiny_ddpm.sample(2, steps=4, sampler="ddim", seed=8))
    assert batch_cap == 4  # lowered to the 2 running lanes, then grown back


def test_a_halved_batch_cap_grows_back_after_good_steps(controlled_ddpm, tiny_ddpm, monkeypatch):
    monkeypatch.setattr("server.engine.scheduler.REGROW_AFTER_STEPS", 2)
    unet = controlled_ddpm.unet
    failures = iter([OutOfMemoryError("fake OOM")])

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=4)) as engine:
            unet.batch_sizes.clear()  # the warm-up's calls
            unet.fault = lambda batch_size: next(failures, None) if batch_size > 2 else None
            done = await submit(engine, GenerationSpec(n=4, steps=6, sampler="ddim", seed=2)).result()
            return done, engine.stats()["batch_cap"]

    done, batch_cap = run(body())
    assert_images_match(done, tiny_ddpm.sample(4, steps=6, sampler="ddim", seed=2))
    # The oldest 2 lanes run alone for 2 steps, then all 4 together, then the 2 that started late finish.
    assert unet.batch_sizes == [2, 2, 4, 4, 4, 4, 2, 2] and batch_cap == 4


def test_a_sticky_device_error_fails_everything_and_turns_the_engine_unhealthy(controlled_ddpm):
    unet = controlled_ddpm.unet

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=1)) as engine:
            unet.gate.clear()
            running = submit(engine, QUICK)
            await wait_until(lambda: engine.stats()["running_lanes"] == 1)
            waiting = submit(engine, QUICK)
            unet.fault = lambda batch_size: RuntimeError(ILLEGAL_ADDRESS)
            unet.gate.set()
            failures = await failure_of(running), await failure_of(waiting)
            with pytest.raises(EngineError, match="failed") as refused:
                submit(engine, QUICK)
            return failures, engine.ready, str(refused.value)

    failures, ready, refusal = run(body())
    assert [failure.code for failure in failures] == ["device_error", "device_error"]
    assert "illegal memory access" in failures[0].message and "restart" in failures[0].message
    assert not ready and "illegal memory access" in refusal


def test_a_device_broken_during_warm_up_is_never_ready(controlled_ddpm):
    controlled_ddpm.unet.fault = lambda batch_size: RuntimeError(ILLEGAL_ADDRESS)

    async def body():
        async with running_engine(controlled_ddpm) as engine:
            with pytest.raises(EngineError):
                submit(engine, QUICK)
            return engine.ready

    assert run(body()) is False


def test_start_returns_after_the_warm_up_call(controlled_ddpm):
    async def body():
        async with running_engine(controlled_ddpm) as engine:
            return list(controlled_ddpm.unet.batch_sizes), engine.ready

    assert run(body()) == (warm_up_batch_sizes(controlled_ddpm.device, EngineConfig().max_batch), True)


def test_out_of_memory_in_warm_up_caps_the_batch_at_the_largest_that_fitted(controlled_ddpm, monkeypatch):
    monkeypatch.setattr(engine_module, "warm_up_batch_sizes", lambda device, cap: [1, 2, 4, 8])
    controlled_ddpm.unet.fault = lambda batch_size: OutOfMemoryError("fake OOM") if batch_size > 2 else None

    async def body():
        async with running_engine(controlled_ddpm, EngineConfig(max_batch=8)) as engine:
            return engine.stats()["batch_cap"], engine.ready

    assert run(body()) == (2, True)


def test_warm_up_covers_every_power_of_two_up_to_the_cap_on_cuda_and_one_call_on_a_cpu():
    assert warm_up_batch_sizes(torch.device("cuda", 0), 32) == [1, 2, 4, 8, 16, 32]
    assert warm_up_batch_sizes(torch.device("cuda", 0), 5) == [1, 2, 4, 5]
    assert warm_up_batch_sizes(torch.device("cpu"), 32) == [1]


@pytest.mark.parametrize("message, broken", [
    (ILLEGAL_ADDRESS, True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: unspecified launch failure", True),
    ("shape mismatch", False),
])
def test_sticky_errors_are_told_by_their_message(message, broken):
    assert device_is_broken(RuntimeError(message), torch.device("cpu")) is broken


@pytest.mark.parametrize("answers", [True, False])
def test_other_cuda_errors_are_fatal_when_the_device_stops_answering(monkeypatch, answers):
    monkeypatch.setattr(faults, "device_answers", lambda device: answers)
    assert device_is_broken(RuntimeError("cuBLAS failed"), torch.device("cuda", 0)) is not answers


def test_the_serving_path_turns_tf32_off_on_cuda_only():
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        serve_in_full_fp32(torch.device("cpu"))
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        serve_in_full_fp32(torch.device("cuda", 0))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_the_step_timer_reports_each_step_on_a_cpu():
    timer = StepTimer(torch.device("cpu"))
    start = timer.start()
    time.sleep(0.01)
    timer.stop(start, batch_size=3)
    ((batch_size, seconds),) = timer.finished()
    assert batch_size == 3 and seconds >= 0.01 and timer.finished() == []


@pytest.mark.gpu
def test_the_step_timer_times_the_device_without_waiting_for_it():
    device = torch.device("cuda", 0)
    timer = StepTimer(device)
    start = timer.start()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of device time, queued at once
    timer.stop(start, batch_size=1)
    assert timer.finished() == []  # still running: read later, never waited for
    torch.cuda.synchronize(device)
    ((_, seconds),) = timer.finished()
    assert seconds > 0.02
