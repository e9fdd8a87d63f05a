"""Asynchronous jobs: the API keeps what the engine forgets.

The engine forgets finished requests, so results are kept here, for `ttl_s` and at most
`max_jobs` at once (finished jobs are dropped oldest first to make room).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from server.api.errors import ApiError
from server.api.limits import OwnerSlots
from server.api.schemas import ErrorBody, JobView
from server.contract import (
    Done,
    EngineClient,
    EngineError,
    Failed,
    GenerationFailed,
    RequestHandle,
    RequestState,
    ValidSpec,
)

CANCEL_WAIT_S = 10.0  # a cancel takes effect at the engine's next step


@dataclass
class Job:
    handle: RequestHandle
    owner: str | None
    created: float = field(default_factory=time.time)
    done: Done | None = None
    failure: Failed | None = None
    finished_at: float | None = None  # monotonic
    waiter: asyncio.Task | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


class JobStore:
    def __init__(self, engine: EngineClient, slots: OwnerSlots, ttl_s: float, max_jobs: int):
        self.engine, self.slots = engine, slots
        self.ttl_s, self.max_jobs = ttl_s, max_jobs
        self.jobs: dict[str, Job] = {}

    def submit(self, spec: ValidSpec) -> Job:
        self.make_room()
        self.slots.acquire(spec.owner)
        try:
            handle = self.engine.submit(spec)
        except EngineError:
            self.slots.release(spec.owner)
            raise
        job = Job(handle=handle, owner=spec.owner)
        job.waiter = asyncio.create_task(self.wait(job), name=f"job-{handle.id}")
        self.jobs[handle.id] = job
        return job

    async def wait(self, job: Job) -> None:
        try:
            job.done = await job.handle.result()
        except GenerationFailed as exc:
            job.failure = exc.failure
        finally:
            job.finished_at = time.monotonic()
            self.slots.release(job.owner)

    async def cancel(self, job: Job) -> None:
        """Cancel and wait for the end; past CANCEL_WAIT_S (a very long step) it ends on its own."""
        if job.finished or not job.handle.cancel():
            return
        try:
            await asyncio.wait_for(asyncio.shield(job.waiter), CANCEL_WAIT_S)
        except asyncio.TimeoutError:
            pass

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def get(self, job_id: str, owner: str | None) -> Job:
        """The job, if it exists and `owner` created it (others get the same 404 as a stranger)."""
        self.drop_expired()
        job = self.jobs.get(job_id)
        if job is None or job.owner != owner:
            raise ApiError(404, "not_found", f"no job {job_id!r} (finished jobs are kept {self.ttl_s:.0f}s)")
        return job

    def view(self, job: Job) -> JobView:
        job_id = job.handle.id
        base = dict(id=job_id, created=int(job.created))
        if job.done is not None:
            total = job.handle.spec.steps
            return JobView(**base, status="succeeded", queue_position=None, step=total, total=total, eta_s=0.0,
                           result=job.done)
        if job.failure is not None:
            status = "cancelled" if job.failure.code == "cancelled" else "failed"
            return JobView(**base, status=status, queue_position=None, step=0, total=0, eta_s=None,
                           error=ErrorBody(code=job.failure.code, message=job.failure.message))
        live = self.engine.status(job_id)
        if live is None:  # finished this instant; the waiter has not run yet
            return JobView(**base, status="running", queue_position=None, step=0, total=0, eta_s=None)
        status = "queued" if live.state == RequestState.QUEUED else "running"
        return JobView(**base, status=status, queue_position=live.queue_position, step=live.step,
                       total=live.total, eta_s=live.eta_s)

    def drop_expired(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        for job_id in [i for i, job in self.jobs.items() if job.finished and job.finished_at < deadline]:
            del self.jobs[job_id]

    def make_room(self) -> None:
        self.drop_expired()
        finished = sorted((job.finished_at, job_id) for job_id, job in self.jobs.items() if job.finished)
        for _, job_id in finished[: max(0, len(self.jobs) - self.max_jobs + 1)]:
            del self.jobs[job_id]
        if len(self.jobs) >= self.max_jobs:
            raise ApiError(429, "too_many_jobs", f"{self.max_jobs} jobs are unfinished; retry later",
                           {"Retry-After": "5"})

    async def close(self) -> None:
        """After the engine has drained: stop any waiter still parked."""
        waiters = [job.waiter for job in self.jobs.values() if job.waiter and not job.waiter.done()]
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
