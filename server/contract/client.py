"""EngineClient: everything the API may ask of an engine, and what an engine tells metrics.

A Protocol, not a base class: the real engine (server.engine.Engine), the tests' fake and a
remote engine each implement it on their own; tests/server/test_contract.py checks each one
against it, member by member.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from .events import Done, Event, ModelInfo, RequestStatus
from .spec import ValidSpec


class RequestHandle(Protocol):
    """One accepted request: its id, its resolved seed, its events and its outcome."""

    id: str
    seed: int
    spec: ValidSpec

    def events(self) -> AsyncIterator[Event]:
        """Queued, Started, Progress, Frame..., then Done or Failed. Only one consumer."""
        ...

    async def result(self) -> Done:
        """Waits for the end; raises GenerationFailed on failure, cancellation or timeout."""
        ...

    def cancel(self) -> bool: ...


class EngineClient(Protocol):
    async def start(self) -> None: ...

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Drain: refuse new work, fail what has not started, let running work finish within
        grace_s (the engine's default when None), fail the rest with code "shutdown"."""
        ...

    @property
    def ready(self) -> bool:
        """Started, alive and accepting work."""
        ...

    def model_info(self) -> ModelInfo: ...

    def submit(self, spec: ValidSpec, on_start: Callable[[], None] | None = None) -> RequestHandle:
        """Accept a request or raise EngineError (QueueFull, EngineClosed). Never blocks.

        `on_start` is called once, before the request's first U-Net call, from the engine's own
        thread, and the engine waits for it: the job store records a run there, so a run that
        kills the worker is still counted. It must be quick and thread-safe."""
        ...

    def cancel(self, request_id: str) -> bool:
        """True if the request was live; it then ends with Failed(code="cancelled")."""
        ...

    def status(self, request_id: str) -> RequestStatus | None:
        """None once the request has ended (the engine forgets it)."""
        ...


class EngineObserver(Protocol):
    """Metrics hooks. An engine calls these from its own thread (and `on_submit` / `on_reject`
    from the caller's): implementations must be quick and thread-safe, as prometheus-client is."""

    def on_submit(self, images: int) -> None: ...

    def on_reject(self, reason: str) -> None:
        """reason: "queue_full", "closed" or "invalid"."""

    def on_step(self, batch_size: int, step_s: float) -> None: ...

    def on_load(self, running_lanes: int, queue_depth: int) -> None:
        """Images being denoised and images waiting: after every iteration, idle ones included."""

    def on_start(self, queue_wait_s: float) -> None: ...

    def on_first_frame(self, seconds: float) -> None:
        """Seconds from submission to the request's first preview frame."""

    def on_finish(self, outcome: str, latency_s: float) -> None:
        """outcome: one of OUTCOMES; latency from submission."""


class NullObserver:
    def on_submit(self, images: int) -> None:
        pass

    def on_reject(self, reason: str) -> None:
        pass

    def on_step(self, batch_size: int, step_s: float) -> None:
        pass

    def on_load(self, running_lanes: int, queue_depth: int) -> None:
        pass

    def on_start(self, queue_wait_s: float) -> None:
        pass

    def on_first_frame(self, seconds: float) -> None:
        pass

    def on_finish(self, outcome: str, latency_s: float) -> None:
        pass
