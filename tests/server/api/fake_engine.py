"""A fake engine with the real one's client interface, for API tests without a model.

Each request runs on its own asyncio task: Queued, then (once `gate` is open) Started, one
Progress per step (`step_s` apart), Frames every `preview_every` steps, and Done with tiny PNGs.
Close `gate` to keep requests queued (queue positions, 429s); cancelling ends a queued request at once.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from dataclasses import dataclass, field

from PIL import Image

from server.contract import (
    Done,
    EngineClosed,
    EngineObserver,
    Failed,
    Frame,
    GeneratedImage,
    GenerationFailed,
    ModelInfo,
    Progress,
    Queued,
    QueueFull,
    RequestLimits,
    RequestState,
    RequestStatus,
    Started,
    ValidSpec,
)


async def first_of(*awaitables) -> None:
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


def tiny_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2, 2), value).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class FakeHandle:
    id: str
    seed: int
    spec: ValidSpec
    state: RequestState = RequestState.QUEUED
    step: int = 0
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    ended: Done | Failed | None = None
    on_start: object = None

    async def events(self):
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, (Done, Failed)):
                return

    async def result(self) -> Done:
        async for event in self.events():
            if isinstance(event, Failed):
                raise GenerationFailed(event)
            if isinstance(event, Done):
                return event
        raise AssertionError("stream ended without Done or Failed")

    def cancel(self) -> bool:
        if self.ended is not None:
            return False
        self.cancelled.set()
        return True


IMAGE_SHAPE = (1, 8, 8)  # what input images are converted to


class FakeEngine:
    def __init__(self, observer: EngineObserver, num_timesteps: int = 50, step_s: float = 0.0, max_queue: int = 64,
                 max_images_per_request: int = 16, paused: bool = False):
        self.num_timesteps, self.step_s, self.max_queue = num_timesteps, step_s, max_queue
        self.limits = RequestLimits(num_timesteps, max_images_per_request, IMAGE_SHAPE)
        self.observer = observer
        self.gate = asyncio.Event()
        if not paused:  # paused: requests stay queued from the start (until gate.set())
            self.gate.set()
        self.handles: dict[str, FakeHandle] = {}
        self.submitted: list[ValidSpec] = []  # every accepted spec, in order
        self.tasks: set[asyncio.Task] = set()
        self.started = self.closing = False
        self.ids = itertools.count()

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, grace_s: float | None = None) -> None:
        self.closing = True
        for handle in self.handles.values():
            handle.cancel()
        self.gate.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self.started and not self.closing

    def queued_images(self) -> int:
        return sum(h.spec.n for h in self.handles.values() if h.state == RequestState.QUEUED)

    def submit(self, spec: ValidSpec, on_start=None) -> FakeHandle:
        assert isinstance(spec, ValidSpec) and spec.limits == self.limits
        if self.closing:
            self.observer.on_reject("closed")
            raise EngineClosed("shutting down")
        if self.queued_images() + spec.n > self.max_queue:
            self.observer.on_reject("queue_full")
            raise QueueFull(retry_after_s=2.5)
        handle = FakeHandle(id=f"req-{next(self.ids)}", seed=spec.seed, spec=spec, on_start=on_start)
        self.handles[handle.id] = handle
        self.submitted.append(spec)
        self.observer.on_submit(spec.n)
        task = asyncio.get_running_loop().create_task(self.run(handle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return handle

    async def run(self, handle: FakeHandle) -> None:
        submitted, spec = time.perf_counter(), handle.spec
        total = spec.steps
        handle.queue.put_nowait(Queued(id=handle.id, position=len(self.handles) - 1))
        await first_of(self.gate.wait(), handle.cancelled.wait())  # a cancel ends a queued request, as in the engine
        if handle.cancelled.is_set():
            return self.finish(handle, Failed(id=handle.id, code="shutdown" if self.closing else "cancelled",
                                              message="cancelled"))
        handle.state = RequestState.RUNNING
        if handle.on_start is not None:
            handle.on_start()
        self.observer.on_start(time.perf_counter() - submitted)
        handle.queue.put_nowait(Started(id=handle.id))
        for step in range(1, total + 1):
            await asyncio.sleep(self.step_s)
            if handle.cancelled.is_set():
                code = "shutdown" if self.closing else "cancelled"
                return self.finish(handle, Failed(id=handle.id, code=code, message="cancelled at step boundary"))
            handle.step = step
            self.observer.on_step(spec.n, self.step_s)
            self.observer.on_load(spec.n, self.queued_images())
            handle.queue.put_nowait(Progress(id=handle.id, step=step, total=total, eta_s=(total - step) * self.step_s))
            if spec.preview_every and step % spec.preview_every == 0:
                for index, kind in itertools.product(range(spec.n), spec.preview_kinds):
                    handle.queue.put_nowait(Frame(id=handle.id, step=step, total=total, index=index, kind=kind,
                                                       png=tiny_png(step % 256)))
        images = [GeneratedImage(index=i, seed=handle.seed * 1000 + i, png=tiny_png(i)) for i in range(spec.n)]
        total_s = time.perf_counter() - submitted
        timings = {"queue_s": 0.0, "run_s": total_s, "total_s": total_s}
        self.finish(handle, Done(id=handle.id, seed=handle.seed, images=images, timings=timings))

    def finish(self, handle: FakeHandle, event: Done | Failed) -> None:
        handle.ended = event
        handle.state = RequestState.SUCCEEDED if isinstance(event, Done) else (
            RequestState.CANCELLED if event.code == "cancelled" else RequestState.FAILED)
        outcome = "succeeded" if isinstance(event, Done) else event.code
        self.observer.on_finish(outcome, 0.01)
        handle.queue.put_nowait(event)
        del self.handles[handle.id]  # the real engine forgets finished requests too

    def cancel(self, request_id: str) -> bool:
        handle = self.handles.get(request_id)
        return handle.cancel() if handle else False

    def status(self, request_id: str) -> RequestStatus | None:
        handle = self.handles.get(request_id)
        if handle is None:
            return None
        queued = handle.state == RequestState.QUEUED
        return RequestStatus(handle.id, handle.state, 0 if queued else None, handle.step, handle.spec.steps, None,
                             handle.spec.owner)

    def model_info(self) -> ModelInfo:
        return ModelInfo(config={}, num_parameters=1, image_shape=(1, 2, 2), num_timesteps=self.num_timesteps,
                         dataset="fake", info={}, device="none", dtype="float32", threads=1, samplers=["ddim", "ddpm"], policy="continuous",
                         limits=self.limits, max_batch=8, max_queue=self.max_queue, max_preview_fps=10.0,
                         default_timeout_s=60.0)
