"""JobService: accepted jobs run through an engine, their records kept in a store.

A job's record is committed before its submission is acknowledged. The service follows each
job's events, writes its status (running when a run starts, then its outcome), and passes the
events on to whoever attaches to it (WS /ws/jobs/{id}). On start, `recover` puts the jobs a
previous process left queued or running back in the queue, in their original order: each is
run again from its record, the same seed giving the same images. A job whose runs were
interrupted `max_attempts` times (a job that kills the worker, say) ends `failed` instead of
running forever. A job cut short by a shutdown goes back to `queued` in a durable store.

Several servers may share a store: each holds its unfinished jobs under a lease it renews; a
server takes over only jobs that no live server holds (its own from a previous life, or those
whose lease ran out), so no job runs twice at once, and a dead server's jobs go on elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from server.contract import (
    Done,
    EngineClient,
    EngineError,
    Event,
    Failed,
    InvalidSpec,
    Progress,
    Queued,
    QueueFull,
    RequestHandle,
    RequestLimits,
    Started,
    ValidSpec,
    validate,
)
from server.contract.channel import EventChannel

from .records import JobRecord, JobRepository, spec_fields

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 10.0  # a cancel takes effect at the engine's next step
PRUNE_EVERY_S = 1.0
REQUEUE_POLL_S = 0.5  # how often recovered jobs that did not fit the engine's queue try again


class OwnerSlots(Protocol):
    """Per-key open requests (server.api.limits.OwnerSlots)."""

    def take(self, owners: Iterable[str | None]) -> None: ...

    def release(self, owner: str | None) -> None: ...


class JobNotFound(LookupError):
    pass


class TooManyJobs(RuntimeError):
    pass


@dataclass
class LiveJob:
    """A job this process is running or about to run."""

    record: JobRecord
    spec: ValidSpec
    handle: RequestHandle | None = None  # None while it waits for room in the engine's queue
    follower: asyncio.Task | None = None
    subscribers: list[EventChannel] = field(default_factory=list)
    latest: Event | None = None  # what a new subscriber is told first
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class JobService:
    def __init__(self, repository: JobRepository, engine: EngineClient, limits: RequestLimits, *,
                 durable: bool, ttl_s: float, max_jobs: int, max_bytes: int, max_attempts: int,
                 worker: str, lease_s: float, slots: OwnerSlots):
        self.repository, self.engine, self.limits = repository, engine, limits
        self.worker, self.lease_s = worker, lease_s  # this server's name in the store, and its jobs' lease
        self.durable, self.ttl_s, self.max_jobs = durable, ttl_s, max_jobs
        self.max_bytes, self.max_attempts = max_bytes, max_attempts
        self.slots = slots  # per-key open requests: a job holds its owner's slot until it ends
        self.live: dict[str, LiveJob] = {}
        self.waiting: list[LiveJob] = []  # recovered, not yet in the engine (its queue was full)
        self.requeuer: asyncio.Task | None = None
        self.keeper: asyncio.Task | None = None
        self.last_prune = 0.0

    # ---- accepting and running ----

    def submit(self, spec: ValidSpec) -> JobRecord:
        """Commit a new job, then hand it to the engine (an EngineError undoes both)."""
        self.prune()
        if len(self.live) >= self.max_jobs:
            raise TooManyJobs(f"{self.max_jobs} jobs are unfinished; retry later")
        record = JobRecord(id=uuid.uuid4().hex, owner=spec.owner, spec=spec_fields(spec), worker=self.worker,
                           lease_until=time.time() + self.lease_s)
        self.repository.add(record)
        job = LiveJob(record, spec)
        try:
            self.start(job)
        except EngineError:
            self.repository.delete(record.id)
            raise
        return record

    def start(self, job: LiveJob) -> None:
        job.handle = self.engine.submit(job.spec, on_start=lambda: self.record_run(job.record))
        self.live[job.record.id] = job
        job.follower = asyncio.create_task(self.follow_run(job), name=f"job-{job.record.id}")

    async def follow_run(self, job: LiveJob) -> None:
        record = job.record
        try:
            async for event in job.handle.events():
                event = event.model_copy(update={"id": record.id})  # clients know the job's id, not the run's
                if isinstance(event, (Done, Failed)):
                    self.finish(record, event)
                job.latest = event if isinstance(event, (Queued, Started, Progress)) else job.latest
                for channel in job.subscribers:
                    channel.put(event)
        except Exception:  # the store failed: the job goes on in the engine's hands, but say so
            log.exception("job %s: its record could not be written", record.id)
        finally:
            self.live.pop(record.id, None)
            job.ended.set()
            self.slots.release(record.owner)

    def record_run(self, record: JobRecord) -> None:
        """From the engine's thread, before the run's first step: so that a run that kills the
        worker is counted, and a crash loop ends at the attempt limit."""
        record.status, record.attempts = "running", record.attempts + 1
        self.repository.save(record)

    def finish(self, record: JobRecord, outcome: Done | Failed) -> None:
        if isinstance(outcome, Failed) and outcome.code == "shutdown" and self.durable:
            record.status = "queued"  # not its fault: the next start runs it again
        elif isinstance(outcome, Done):
            record.status, record.finished = "succeeded", time.time()
            record.result = outcome.model_dump_json(by_alias=True)
        else:
            record.status = "cancelled" if outcome.code == "cancelled" else "failed"
            record.finished, record.error = time.time(), {"code": outcome.code, "message": outcome.message}
        self.repository.save(record)

    # ---- after a restart ----

    def recover(self) -> int:
        """Queue again the unfinished jobs no live server holds (this server's previous life's, or
        those of a server whose lease ran out); returns how many."""
        recovered = 0
        now = time.time()
        ours = set(self.live) | {job.record.id for job in self.waiting}
        for record in self.repository.claim(self.worker, now, now + self.lease_s):
            if record.id in ours:
                continue
            if record.status == "running" and record.attempts >= self.max_attempts:
                self.fail(record, "interrupted", f"interrupted {record.attempts} times (the server stopped during "
                                                 f"each run); not run again (--job-max-attempts {self.max_attempts})")
                continue
            try:
                spec = validate(record.request(), self.limits)
            except InvalidSpec as exc:
                self.fail(record, "invalid_request", f"the model served now refuses this job: {exc}")
                continue
            record.status = "queued"
            self.repository.save(record)
            self.waiting.append(LiveJob(record, spec))
            self.slots.take([record.owner])  # accepted before: it runs, past the per-key limit if need be
            recovered += 1
        if self.waiting and (self.requeuer is None or self.requeuer.done()):
            self.requeuer = asyncio.create_task(self.requeue(), name="job-requeue")
        return recovered

    def keep_leases(self, on_recovered=lambda count: None) -> None:
        """From now on: renew this server's leases three times a lease, and once a lease take
        over the jobs of servers whose leases ran out (a replica that died)."""
        async def keep() -> None:
            ticks = 0
            while True:
                await asyncio.sleep(self.lease_s / 3)
                ticks += 1
                try:
                    self.repository.renew(self.worker, time.time() + self.lease_s)
                    if ticks % 3 == 0 and (count := self.recover()):
                        log.info("took over %d jobs whose server stopped renewing them", count)
                        on_recovered(count)
                except Exception:
                    log.exception("renewing this server's job leases failed")

        self.keeper = asyncio.create_task(keep(), name="job-leases")

    async def requeue(self) -> None:
        while self.waiting:
            job = self.waiting[0]
            try:
                self.start(job)
            except QueueFull:
                await asyncio.sleep(REQUEUE_POLL_S)
                continue
            except EngineError as exc:  # closing: the jobs stay queued in the store for the next start
                log.warning("recovered jobs not run: %s", exc)
                return
            self.waiting.pop(0)

    def fail(self, record: JobRecord, code: str, message: str) -> None:
        record.status, record.finished, record.error = "failed", time.time(), {"code": code, "message": message}
        self.repository.save(record)

    # ---- reading, cancelling, attaching ----

    def get(self, job_id: str, owner: str | None) -> JobRecord:
        """The job, if it exists and `owner` created it (others get the same answer as a stranger)."""
        self.prune()
        job = self.live.get(job_id)
        record = job.record if job is not None else self.repository.get(job_id)
        if record is None or record.owner != owner:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept {self.ttl_s:.0f}s)")
        return record

    def live_job(self, job_id: str) -> LiveJob | None:
        return self.live.get(job_id) or next((job for job in self.waiting if job.record.id == job_id), None)

    async def cancel(self, job_id: str) -> None:
        """Cancel and wait for the end; past CANCEL_WAIT_S (a very long step) it ends on its own."""
        job = self.live_job(job_id)
        if job is None:
            return
        if job.handle is None:  # still waiting for room: never reached the engine
            self.waiting.remove(job)
            cancelled = Failed(id=job_id, code="cancelled", message="cancelled by the client")
            self.finish(job.record, cancelled)
            for channel in job.subscribers:
                channel.put(cancelled)
            self.slots.release(job.record.owner)
            return
        if job.handle.cancel():
            try:
                await asyncio.wait_for(job.ended.wait(), CANCEL_WAIT_S)
            except asyncio.TimeoutError:
                pass

    async def delete(self, job_id: str) -> None:
        await self.cancel(job_id)
        self.repository.delete(job_id)

    async def events(self, job_id: str) -> AsyncIterator[Event]:
        """The job's events from now on, after what it is doing now; its outcome if it has ended."""
        job = self.live_job(job_id)
        if job is None:
            record = self.repository.get(job_id)
            if record is not None and not record.unfinished:
                yield outcome_of(record)
            return
        channel = EventChannel(asyncio.get_running_loop())
        channel.put(job.latest or Queued(id=job_id, position=0))
        job.subscribers.append(channel)
        try:
            async for event in channel.stream():
                yield event
        finally:
            job.subscribers.remove(channel)

    # ---- housekeeping ----

    def prune(self) -> None:
        now = time.time()
        if now - self.last_prune >= PRUNE_EVERY_S:
            self.last_prune = now
            self.repository.prune(now - self.ttl_s, self.max_bytes)

    async def close(self) -> None:
        """After the engine has drained: stop the tasks still parked."""
        tasks = [job.follower for job in self.live.values() if job.follower] + [self.requeuer, self.keeper]
        for task in filter(None, tasks):
            task.cancel()
        await asyncio.gather(*filter(None, tasks), return_exceptions=True)
        self.repository.close()


def outcome_of(record: JobRecord) -> Done | Failed:
    done = record.done()
    if done is not None:
        return done
    return Failed(id=record.id, code=record.error["code"], message=record.error["message"])
