"""The engine: one thread owns every running lane and runs the model; callers send it messages.

Callers (the asyncio loop) submit, cancel and read status under a short lock on the waiting
queue and the request registry. The engine thread does the rest, one iteration at a time:

    sweep     end cancelled, timed-out and (when shutting down) unstarted requests
    schedule  the scheduler says how many waiting lanes to admit and how many lanes to run
    step      one U-Net call over those lanes, each with its own t, sampler and noise
    publish   frames that are due, progress, finished requests (PNGs encoded in a pool)

A failing step fails exactly the requests in its batch; on device out-of-memory the batch
cap is halved and the step retried first (and the cap grows back after good steps). A device
that fails for good (a sticky CUDA error) fails every request with code "device_error" and
turns the engine unhealthy: `ready` goes false (/readyz, the Docker health check) and `submit`
refuses work with the reason. Shutdown stops accepting, fails what has not started, finishes
what runs, and past the grace period fails the rest with code "shutdown".

Before `start` returns, the engine thread runs the U-Net once per batch shape it will meet
(CUDA) or once (CPU): first calls pay one-time set-up costs the first requests should not.
On CUDA the serving path computes in full fp32 (TF32 off): cuDNN picks its algorithms per
batch size, and with TF32 an image could depend on the batch it shares beyond fp32 rounding.
Step times come from CUDA events read once the device has passed them (no host-device sync).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence

import torch

from model import DDPM
from model.precision import dtype_name
from model.samplers import SAMPLERS
from server.contract import (
    EngineClosed,
    EngineConfig,
    EngineError,
    EngineObserver,
    Failed,
    ModelInfo,
    NullObserver,
    Progress,
    Queued,
    QueueFull,
    RequestLimits,
    RequestState,
    RequestStatus,
    Started,
    ValidSpec,
)
from server.contract.channel import ChannelHandle, EventChannel

from .faults import device_is_broken, is_out_of_memory
from .publisher import Publisher
from .request import Lane, Request
from .runner import Runner
from .scheduler import Scheduler
from .sources import lane_starts, resampling
from .timing import StepTimer

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.25  # how often an idle engine looks at deadlines and the shutdown grace
COLD_STEP_S = 0.05  # a step's duration before any was measured (a small model on a CPU)
MAX_RETRY_AFTER_S = 120.0  # past this, "later" is all an estimate can honestly say


def retry_after_s(excess: int, running: list[int], waiting: list[int], batch_cap: int, step_s: float) -> float:
    """Seconds until `excess` more images fit the queue, i.e. until that many waiting images
    have been admitted. running: steps left per running lane; waiting: steps per waiting image,
    in queue order. A slot frees when a running lane finishes; past the running lanes, each
    further batch_cap admissions wait one lifetime of the waiting lanes admitted before."""
    if excess <= 0:
        return 1.0
    running = sorted(running)
    if excess <= len(running):
        steps = running[excess - 1]
    else:
        rounds = math.ceil((excess - len(running)) / batch_cap)
        lifetime = sum(waiting) / len(waiting) if waiting else 0
        steps = (running[-1] if running else 0) + rounds * lifetime
    return min(MAX_RETRY_AFTER_S, max(1.0, steps * step_s))


OUTCOME_OF_CODE = {"cancelled": "cancelled", "timeout": "timeout", "shutdown": "shutdown"}


class Engine:
    def __init__(self, ddpm: DDPM, config: EngineConfig = EngineConfig(), observer: EngineObserver | None = None):
        self.config = config
        self.observer = observer or NullObserver()
        self._runner = Runner(ddpm)
        serve_in_full_fp32(self._runner.device)
        self._torch_threads = config.torch_threads or torch.get_num_threads()
        self._scheduler = Scheduler(config.policy, config.max_batch)
        self.limits = RequestLimits(self._runner.num_timesteps, config.max_images_per_request,
                                    tuple(self._runner.image_shape))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publisher: Publisher | None = None
        self._thread: threading.Thread | None = None
        self._wakeup = threading.Event()
        self._warmed_up = threading.Event()
        # Shared with callers, under _lock.
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()  # requests with lanes not yet admitted, FIFO
        self._waiting_images = 0
        self._closing = False
        self._grace_deadline = math.inf
        self._fault: str | None = None  # why the engine can serve nothing more (its device failed)
        # The engine thread's own.
        self._running: list[Lane] = []  # admission order
        self._timer = StepTimer(self._runner.device)
        self._step_s = 0.0  # moving average of one step's duration

    # ---- lifecycle (on the asyncio loop) ----

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self._loop = asyncio.get_running_loop()
        self._publisher = Publisher(self._loop, self.config.encoder_threads)
        self._thread = threading.Thread(target=self._run, name="ddpm-engine", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._warmed_up.wait)

    async def shutdown(self, grace_s: float | None = None) -> None:
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        with self._lock:
            self._closing = True
            self._grace_deadline = min(self._grace_deadline, time.monotonic() + grace_s)
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            await asyncio.to_thread(self._publisher.close)

    @property
    def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._closing and self._fault is None

    # ---- the client interface (on the asyncio loop; never blocks) ----

    def submit(self, spec: ValidSpec, on_start: Callable[[], None] | None = None) -> ChannelHandle:
        if not isinstance(spec, ValidSpec) or spec.limits != self.limits:
            raise TypeError("submit takes a ValidSpec from server.contract.validate(spec, engine.model_info().limits)")
        if self._loop is None:
            self.observer.on_reject("closed")
            raise EngineClosed("the engine has not been started")
        jumps = resampling(spec.source)
        plan = self._runner.plan(spec.sampler, spec.steps, spec.eta, resampling=jumps)
        timeout_s = self.config.default_timeout_s if spec.timeout_s is None else spec.timeout_s
        channel = EventChannel(self._loop)
        starts = lane_starts(spec.source, spec.n, plan.timesteps, self._runner.num_timesteps)
        lane_plans = [self._runner.plan(spec.sampler, spec.steps, spec.eta, start.cursor, jumps) for start in starts]
        request = Request(uuid.uuid4().hex, spec, plan, timeout_s, channel, on_start, starts, lane_plans)
        with self._lock:
            if self._fault is not None:
                rejection = "failed"
            elif self._closing:
                rejection = "closed"
            elif self._waiting_images + spec.n > self.config.max_queue:
                rejection = "queue_full"
            else:
                rejection = None
                self._requests[request.id] = request
                self._waiting.append(request)
                self._waiting_images += spec.n
                position = len(self._waiting) - 1
        if rejection == "failed":
            self.observer.on_reject("closed")
            raise EngineError(self._fault)
        if rejection == "closed":
            self.observer.on_reject("closed")
            raise EngineClosed("the engine is shutting down")
        if rejection == "queue_full":
            self.observer.on_reject("queue_full")
            raise QueueFull(self._retry_after_s(spec.n))
        channel.put(Queued(id=request.id, position=position))
        self.observer.on_submit(spec.n)
        self._wakeup.set()
        return ChannelHandle(request.id, spec.seed, spec, channel, self.cancel)

    def cancel(self, request_id: str) -> bool:
        """True if the request was live; it ends with Failed(code="cancelled") at the next step."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                return False
            request.cancel_requested = True
        self._wakeup.set()
        return True

    def status(self, request_id: str) -> RequestStatus | None:
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                return None
            queued = request.state is RequestState.QUEUED
            return RequestStatus(
                request_id=request.id,
                state=request.state,
                queue_position=self._waiting.index(request) if queued else None,
                step=request.step,
                total=request.total,
                eta_s=None if queued else self._eta_s(request),
                owner=request.spec.owner,
            )

    def model_info(self) -> ModelInfo:
        ddpm = self._runner.ddpm
        return ModelInfo(
            config=ddpm.config.to_dict(),
            num_parameters=ddpm.num_parameters(),
            image_shape=ddpm.image_shape,
            num_timesteps=self._runner.num_timesteps,
            dataset=ddpm.info.get("dataset"),
            info=ddpm.info,
            device=str(self._runner.device),
            dtype=dtype_name(ddpm.dtype),
            threads=self._torch_threads,
            samplers=sorted(SAMPLERS),
            policy=self.config.policy,
            limits=self.limits,
            max_batch=self.config.max_batch,
            max_queue=self.config.max_queue,
            max_preview_fps=self.config.max_preview_fps,
            default_timeout_s=self.config.default_timeout_s,
        )

    def stats(self) -> dict:
        with self._lock:
            running_requests = sum(r.state is RequestState.RUNNING for r in self._requests.values())
            queue_depth = self._waiting_images
        return {
            "queue_depth": queue_depth,
            "running_lanes": len(self._running),
            "running_requests": running_requests,
            "steps_per_s": 1.0 / self._step_s if self._step_s else 0.0,
            "batch_cap": self._scheduler.batch_cap,
            "policy": self.config.policy,
        }

    def _retry_after_s(self, images: int) -> float:
        """When `images` more would fit, from the work actually ahead and the measured step time."""
        running = [len(lane.plan) - lane.cursor for lane in list(self._running)]
        with self._lock:
            waiting = [len(request.plan) for request in self._waiting for _ in range(request.lanes_waiting)]
            excess = self._waiting_images + images - self.config.max_queue
        return retry_after_s(excess, running, waiting, self._scheduler.batch_cap, self._step_s or COLD_STEP_S)

    def _eta_s(self, request: Request) -> float | None:
        return (request.total - request.step) * self._step_s if self._step_s else None

    # ---- the engine thread ----

    def _run(self) -> None:
        # torch's thread count is per thread under OpenMP: a new thread must set its own.
        # For the full count to pay, no other thread of the process should have run an
        # OpenMP team (see server.app.reserve_cores_for_engine).
        torch.set_num_threads(self._torch_threads)
        try:
            with torch.inference_mode():
                self._warm_up()
                self._warmed_up.set()
                while self._iterate():
                    pass
        except BaseException as exc:  # a bug in the loop itself: still end every request, and say so
            log.exception("the engine loop crashed")
            self._fail_everything("internal", f"the engine stopped: {exc!r}")
            self._publisher.flush()
        finally:
            self._warmed_up.set()  # start() returns whatever happened

    def _warm_up(self) -> None:
        """The first U-Net call of each batch shape pays one-time costs (CUDA: lazy kernel
        loading, cuDNN and cuBLAS set-up, allocator growth; CPU: oneDNN set-up) that would
        otherwise land on the first requests. An out-of-memory lowers the batch cap as in
        service; a broken device fails the engine before it is ready."""
        unet, device = self._runner.ddpm.unet, self._runner.device
        fitted = 0
        for batch_size in warm_up_batch_sizes(device, self._scheduler.batch_cap):
            x = torch.zeros(batch_size, *self._runner.image_shape, device=device)
            t = torch.zeros(batch_size, dtype=torch.long, device=device)
            try:
                unet(x, t)
            except Exception as exc:
                if is_out_of_memory(exc):
                    release_cached_memory(device)
                    log.warning("out of device memory warming up batch %d; batch cap now %d", batch_size, fitted or 1)
                    self._scheduler.lower_batch_cap(fitted)
                elif device_is_broken(exc, device):
                    self._break_down(exc)
                else:  # requests will show whether it was the shape or the model
                    log.error("the warm-up call at batch %d failed", batch_size, exc_info=exc)
                return
            fitted = batch_size

    def _iterate(self) -> bool:
        """One scheduling iteration; False when shut down and empty."""
        self._wakeup.clear()  # before looking: a submit from now on wakes the wait below
        self._sweep(time.monotonic())
        batch = self._admit()
        if batch:
            self._step(batch)
        self._record_step_times()
        self._publisher.flush()
        self.observer.on_load(len(self._running), self._waiting_images)
        return bool(batch) or self._wait_for_work()

    def _wait_for_work(self) -> bool:
        """Idle: False when shut down with nothing left, else waits for a submit or a tick."""
        with self._lock:
            if self._closing and not self._requests:
                return False
        self._wakeup.wait(IDLE_WAIT_S)
        return True

    def _sweep(self, now: float) -> None:
        with self._lock:
            requests = list(self._requests.values())
            closing = self._closing
            past_grace = closing and now >= self._grace_deadline
        for request in requests:
            if request.cancel_requested:
                self._end(request, "cancelled", "cancelled by the client")
            elif now >= request.deadline:
                self._end(request, "timeout", f"not finished within {request.deadline - request.submitted_at:g}s")
            elif past_grace:
                self._end(request, "shutdown", "the server shut down before the request finished")
            elif closing and request.state is RequestState.QUEUED:
                self._end(request, "shutdown", "the server is shutting down; the request had not started")

    def _admit(self) -> list[Lane]:
        """Admits the lanes the scheduler picks; returns the lanes to step now."""
        started = []
        failure: tuple[Request, Exception] | None = None
        with self._lock:
            waiting = (request.lanes_waiting for request in self._waiting)
            plan = self._scheduler.schedule(waiting, len(self._running))
            for count in plan.admit:
                request = self._waiting[0]
                try:  # a lane's x_T is allocated on the device: that can run out of memory too
                    lanes = request.admit_lanes(count, self._runner.ddpm.diffusion, self._runner.image_shape,
                                                self._runner.device)
                except Exception as exc:
                    failure = (request, exc)
                    break
                self._running.extend(lanes)
                self._waiting_images -= count
                if request.state is RequestState.QUEUED:
                    request.state = RequestState.RUNNING
                    request.started_at = time.monotonic()
                    started.append(request)
                if not request.lanes_waiting:
                    self._waiting.popleft()
        for request in started:
            request.announce_start()
            self._publisher.send(request.channel, Started(id=request.id))
            self.observer.on_start(request.started_at - request.submitted_at)
        if failure is not None:
            self._admission_failed(*failure)
        return self._running[: plan.run]

    def _admission_failed(self, request: Request, error: Exception) -> None:
        """New lanes could not be made. Out of memory: no more admissions until good steps
        regrow the cap, or, with nothing running to free memory, the request fails."""
        if is_out_of_memory(error):
            release_cached_memory(self._runner.device)
            if self._running:
                log.warning("out of device memory admitting lanes beside %d running; batch cap now %d",
                            len(self._running), len(self._running))
                self._scheduler.lower_batch_cap(len(self._running))
            else:
                self._end(request, "out_of_memory", "out of device memory creating the request's starting noise")
        elif device_is_broken(error, self._runner.device):
            self._break_down(error)
        else:
            log.error("admitting the lanes of request %s failed", request.id, exc_info=error)
            self._end(request, "internal", f"starting the request failed: {error!r}")

    def _step(self, batch: list[Lane]) -> None:
        start = self._timer.start()
        try:
            x_prev, x0 = self._runner.step(batch)
        except Exception as exc:
            self._step_failed(batch, exc)
            return
        self._timer.stop(start, len(batch))
        self._scheduler.step_succeeded()
        for lane, x in zip(batch, x_prev, strict=True):
            lane.advance(x)
        self._publish(batch, x_prev, x0)

    def _step_failed(self, batch: list[Lane], error: Exception) -> None:
        if is_out_of_memory(error):
            release_cached_memory(self._runner.device)
            if self._scheduler.halve_batch_cap():
                log.warning("out of device memory at batch %d; batch cap now %d", len(batch), self._scheduler.batch_cap)
                return  # the next iteration retries the oldest lanes at the smaller cap
            self._fail_batch(batch, "out_of_memory", "out of device memory even at batch size 1")
        elif device_is_broken(error, self._runner.device):
            self._break_down(error)
        else:
            log.error("a denoising step failed; failing the %d lanes of its batch", len(batch), exc_info=error)
            self._fail_batch(batch, "internal", f"a denoising step failed: {error!r}")

    def _record_step_times(self) -> None:
        """Steps the device has finished (on CUDA, read without waiting for it: see timing)."""
        for batch_size, step_s in self._timer.finished():
            self._step_s = step_s if not self._step_s else 0.9 * self._step_s + 0.1 * step_s
            self.observer.on_step(batch_size, step_s)

    def _break_down(self, error: Exception) -> None:
        """The device failed for good: every request fails, and the engine reports unhealthy
        and refuses work until the process is restarted (a sticky CUDA error cannot be undone)."""
        log.critical("device %s failed and cannot recover: %s; failing every request, restart the server",
                     self._runner.device, error)
        self._fail_everything("device_error", f"the device {self._runner.device} failed ({error}); "
                                              f"this server cannot compute until it is restarted")

    def _publish(self, batch: Sequence[Lane], x_prev: Sequence[torch.Tensor], x0: Sequence[torch.Tensor]) -> None:
        """After a step: due frames, progress, finished images and requests."""
        rows_of: dict[Request, list[int]] = {}
        for row, lane in enumerate(batch):
            rows_of.setdefault(lane.request, []).append(row)
        now = time.monotonic()
        any_finished = False
        for request, rows in rows_of.items():
            if request.spec.preview_every:
                self._publish_frames(request, [batch[row] for row in rows], [x_prev[row] for row in rows],
                                     [x0[row] for row in rows], now)
            for row in rows:
                lane = batch[row]
                if lane.finished:
                    request.finals[lane.index] = lane.x
                    any_finished = True
            if request.done:
                self._complete(request, now)
            elif now - request.last_progress_at >= self.config.progress_interval_s:
                request.last_progress_at = now
                self._publisher.send(request.channel, Progress(id=request.id, step=request.step, total=request.total,
                                                               eta_s=self._eta_s(request)))
        if any_finished:
            self._running = [lane for lane in self._running if not lane.finished]

    def _publish_frames(self, request: Request, lanes: list[Lane], x_t: list[torch.Tensor],
                        x0: list[torch.Tensor], now: float) -> None:
        if now - request.last_frame_at < 1.0 / self.config.max_preview_fps:
            return
        every = request.spec.preview_every
        frames = {}
        for lane, lane_x_t, lane_x0 in zip(lanes, x_t, x0, strict=True):
            if lane.cursor % every or lane.finished:  # the final image comes with Done
                continue
            for kind in request.spec.preview_kinds:
                frames[(lane.index, kind)] = (lane.cursor, lane_x_t if kind == "x_t" else lane_x0)
        if not frames:
            return
        request.last_frame_at = now
        if not request.frames_sent:
            self.observer.on_first_frame(now - request.submitted_at)
        request.frames_sent += 1
        self._publisher.send_frames(request, frames)

    def _complete(self, request: Request, now: float) -> None:
        with self._lock:
            del self._requests[request.id]
            request.state = RequestState.SUCCEEDED
        self._publisher.send(request.channel, Progress(id=request.id, step=request.total, total=request.total, eta_s=0.0))
        timings = {
            "queue_s": request.started_at - request.submitted_at,
            "run_s": now - request.started_at,
            "total_s": now - request.submitted_at,
        }
        self._publisher.send_done(request, timings)
        self.observer.on_finish("succeeded", timings["total_s"])

    def _fail_everything(self, code: str, message: str) -> None:
        """Ends every live request with `code`; from now on `submit` refuses work with `message`."""
        with self._lock:
            self._fault = message
            requests = list(self._requests.values())
        for request in requests:
            self._end(request, code, message)

    def _fail_batch(self, batch: Sequence[Lane], code: str, message: str) -> None:
        for request in dict.fromkeys(lane.request for lane in batch):
            self._end(request, code, message)

    def _end(self, request: Request, code: str, message: str) -> None:
        """Ends a live request with Failed(code) and frees its lanes and queue slots."""
        with self._lock:
            if self._requests.pop(request.id, None) is None:
                return
            if request.lanes_waiting:
                self._waiting.remove(request)
                self._waiting_images -= request.lanes_waiting
            request.state = RequestState.CANCELLED if code == "cancelled" else RequestState.FAILED
        if request.lanes:
            self._running = [lane for lane in self._running if lane.request is not request]
        self._publisher.forget(request)
        self._publisher.send(request.channel, Failed(id=request.id, code=code, message=message))
        self.observer.on_finish(OUTCOME_OF_CODE.get(code, "failed"), time.monotonic() - request.submitted_at)


def warm_up_batch_sizes(device: torch.device, batch_cap: int) -> list[int]:
    """CUDA: every power of two up to the cap, and the cap (kernels are chosen per shape).
    CPU: batch 1 only; there first-call costs hardly depend on the shape, and each call of a
    large batch takes a good part of a second."""
    if device.type != "cuda":
        return [1]
    sizes = [1 << power for power in range(batch_cap.bit_length())]
    return sizes if sizes[-1] == batch_cap else [*sizes, batch_cap]


def serve_in_full_fp32(device: torch.device) -> None:
    """TF32 off for cuDNN convolutions and matmuls (torch turns it on for convolutions): with
    its 10-bit mantissas, an image could differ with the batch it shares by more than fp32
    rounding (bench/gpu_check.py measures both). The legacy flags, which every torch from 2.3
    to 2.13 reads; a bf16 U-Net (model.load's dtype) is not affected."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def release_cached_memory(device: torch.device) -> None:
    """After an out-of-memory: hand the allocator's cached blocks back, so the retry at a
    smaller batch can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
