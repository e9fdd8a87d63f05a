"""RemoteEngine: the EngineClient of an ingress, whose engines are Ray Serve replicas.

Each request runs as one task on the ingress's loop: a streaming call through the replicas'
deployment handle (Ray's router picks a replica with free slots), whose items go into the
request's EventChannel exactly as a local engine's would. The API sees a ChannelHandle and
cannot tell the difference.

A replica that dies mid-request loses nothing: the request is sent again (Ray routes it to a
live replica) from the same validated spec, so the same seed gives the same images; clients
see a `requeued` event. Runs that had started count towards `max_attempts`, like a job's runs.
Each run's `queued` and `started` events name the replica that took it (`replica`), and an HTTP
request's run names it in the request's `Served` (its X-DDPM-Replica header).

Torch-free: the ingress never loads the model.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError

from server.contract import (
    Done,
    EngineClosed,
    EngineObserver,
    Failed,
    ModelInfo,
    Progress,
    Queued,
    QueueFull,
    RequestState,
    RequestStatus,
    Requeued,
    Started,
    ValidSpec,
)
from server.contract.channel import ChannelHandle, EventChannel
from server.jobs.records import spec_fields

log = logging.getLogger(__name__)

BOARD_POLL_S = 0.5  # how fresh the ingress's view of the replicas' load is
REFUSED_RETRY_S = 0.5  # a replica refused (full or draining): ask again, Ray may route elsewhere
MAX_RETRY_AFTER_S = 120.0


class Served:
    """Which replica took an HTTP request's run, for its X-DDPM-Replica header. The ingress
    middleware puts one in each request's context (`served_by`); `submit` ties it to the run it
    starts, which names its replica here on each placement (so, after a re-run, the replica that
    made the images). `settled` is set once a replica is known or the run has ended."""

    def __init__(self) -> None:
        self.replica: str | None = None
        self.submitted = False
        self.settled = asyncio.Event()

    def place(self, replica: str) -> None:
        self.replica = replica
        self.settled.set()


served_by: contextvars.ContextVar[Served | None] = contextvars.ContextVar("served_by", default=None)


@dataclass(frozen=True)
class Placement:
    """A replica's first answer to `generate`: it accepted the request."""

    replica: str


@dataclass(frozen=True)
class Refusal:
    """A replica's only answer when its engine refused the request (queue full or draining)."""

    reason: str
    retry_after_s: float


@dataclass
class RemoteRun:
    id: str
    spec: ValidSpec
    channel: EventChannel
    on_start: Callable[[], None] | None
    served: Served | None = None  # the HTTP request's, if one submitted the run
    submitted: float = field(default_factory=time.monotonic)
    latest: Queued | Started | Progress | None = None
    runs_started: int = 0
    replica: str | None = None
    task: asyncio.Task | None = None
    end_code: str = "cancelled"  # what a cancellation of the task means: the client's, or a shutdown


class ReplicaLost(Exception):
    pass


class RemoteEngine:
    """EngineClient over a deployment handle of EngineReplica and one of ReplicaBoard."""

    def __init__(self, replicas: Any, board: Any, observer: EngineObserver, *, max_attempts: int,
                 max_replicas: int, grace_s: float):
        self.replicas, self.board, self.observer = replicas, board, observer
        self.max_attempts, self.max_replicas, self.grace_s = max_attempts, max_replicas, grace_s
        self.info: ModelInfo | None = None
        self.runs: dict[str, RemoteRun] = {}
        self.live_replicas: list[dict] = []  # the board's latest snapshot
        self.poller: asyncio.Task | None = None
        self.closing = False

    # ---- lifecycle ----

    async def start(self) -> None:
        self.info = await self.replicas.model_info.remote()
        await self.refresh()
        self.poller = asyncio.create_task(self.poll_board(), name="replica-board")

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Refuse new work; let running requests finish within the grace, then end them "shutdown"."""
        self.closing = True
        grace_s = self.grace_s if grace_s is None else grace_s
        tasks = [run.task for run in self.runs.values() if run.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for run in list(self.runs.values()):
            run.end_code = "shutdown"
            run.task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.poller:
            self.poller.cancel()

    @property
    def ready(self) -> bool:
        return self.info is not None and not self.closing and bool(self.live_replicas)

    def model_info(self) -> ModelInfo:
        return self.info

    async def poll_board(self) -> None:
        while True:
            await asyncio.sleep(BOARD_POLL_S)
            try:
                await self.refresh()
            except Exception:  # the board restarts with Ray: keep the last view meanwhile
                log.warning("the replica board did not answer", exc_info=True)

    async def refresh(self) -> None:
        self.live_replicas = await self.board.snapshot.remote()

    # ---- the client interface ----

    def submit(self, spec: ValidSpec, on_start: Callable[[], None] | None = None) -> ChannelHandle:
        if self.closing or self.info is None:
            self.observer.on_reject("closed")
            raise EngineClosed("the server is shutting down")
        waiting = sum(run.spec.n for run in self.runs.values() if run.runs_started == 0)
        capacity = self.max_replicas * self.info.max_queue
        if waiting + spec.n > capacity:
            self.observer.on_reject("queue_full")
            raise QueueFull(self.retry_after_s(waiting + spec.n - capacity, spec.steps))
        run = RemoteRun(uuid.uuid4().hex, spec, EventChannel(asyncio.get_running_loop()), on_start, served_by.get())
        if run.served is not None:
            run.served.submitted = True
        self.runs[run.id] = run
        run.task = asyncio.create_task(self.follow(run), name=f"remote-{run.id}")
        return ChannelHandle(run.id, spec.seed, spec, run.channel, self.cancel)

    def cancel(self, request_id: str) -> bool:
        run = self.runs.get(request_id)
        if run is None or run.task.done():
            return False
        run.task.cancel()
        return True

    def status(self, request_id: str) -> RequestStatus | None:
        run = self.runs.get(request_id)
        if run is None:
            return None
        latest = run.latest
        progress = latest if isinstance(latest, Progress) else None
        return RequestStatus(
            request_id=run.id,
            state=RequestState.RUNNING if run.runs_started else RequestState.QUEUED,
            queue_position=latest.position if isinstance(latest, Queued) else None,
            step=progress.step if progress else 0,
            total=progress.total if progress else run.spec.steps,
            eta_s=progress.eta_s if progress else None,
            owner=run.spec.owner,
        )

    def retry_after_s(self, excess_images: int, steps: int) -> float:
        """Seconds until `excess_images` fit: rounds of full batches over the live replicas, each
        as long as this request's steps at the replicas' measured step time."""
        replicas = self.live_replicas or [{"steps_per_s": 0.0}]
        steps_per_s = min(replica["steps_per_s"] for replica in replicas) or 1.0
        rounds = math.ceil(excess_images / (len(replicas) * self.info.max_batch))
        return min(MAX_RETRY_AFTER_S, max(1.0, rounds * steps / steps_per_s))

    # ---- one request ----

    async def follow(self, run: RemoteRun) -> None:
        try:
            while True:
                try:
                    outcome = await self.run_once(run)
                except ReplicaLost as exc:
                    if run.runs_started >= self.max_attempts:
                        outcome = Failed(id=run.id, code="replica_lost", message=f"{exc}; "
                                         f"{run.runs_started} runs started, the limit is {self.max_attempts}")
                    else:
                        log.warning("request %s: %s; running it again", run.id, exc)
                        run.channel.put(Requeued(id=run.id, attempt=run.runs_started + 1, reason=str(exc)))
                        continue
                if outcome is not None:
                    break
                if time.monotonic() - run.submitted > (run.spec.timeout_s or self.info.default_timeout_s):
                    outcome = Failed(id=run.id, code="timeout", message="no replica could take the request in time")
                    break
                await asyncio.sleep(REFUSED_RETRY_S)
            run.channel.put(outcome)
        except asyncio.CancelledError:
            message = "the server shut down" if run.end_code == "shutdown" else "cancelled by the client"
            run.channel.put(Failed(id=run.id, code=run.end_code, message=message))
        finally:
            self.runs.pop(run.id, None)
            if run.served is not None:
                run.served.settled.set()

    async def run_once(self, run: RemoteRun) -> Done | Failed | None:
        """One streaming call: the outcome, None if the replica refused, ReplicaLost if it died."""
        stream = self.replicas.options(stream=True).generate.remote(spec_fields(run.spec))
        started_here = False
        try:
            async for item in stream:
                if isinstance(item, Refusal):
                    return None
                if isinstance(item, Placement):
                    run.replica = item.replica
                    if run.served is not None:
                        run.served.place(item.replica)
                    continue
                update = {"id": run.id}  # clients know the ingress's id, not the run's
                if isinstance(item, (Queued, Started)):
                    update["replica"] = run.replica  # WebSocket clients learn where their request runs
                event = item.model_copy(update=update)
                if isinstance(event, Started):
                    started_here = True
                    run.runs_started += 1
                    if run.on_start is not None:
                        run.on_start()
                if isinstance(event, (Queued, Started, Progress)):
                    run.latest = event
                if isinstance(event, (Done, Failed)):
                    return event
                run.channel.put(event)
            raise ReplicaLost(f"replica {run.replica} ended the stream without an outcome")
        except RayActorError as exc:
            where = f"replica {run.replica}" if started_here else "a replica"
            raise ReplicaLost(f"{where} died ({type(exc).__name__})") from None
        finally:
            stream.cancel()  # a no-op once it ended; else Ray cancels the replica's generator, freeing its lanes
