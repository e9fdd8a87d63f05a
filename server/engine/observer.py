"""Metrics hooks. The engine calls these from its own thread (and `on_submit` / `on_reject`
from the caller's): implementations must be quick and thread-safe, as prometheus-client is."""

from __future__ import annotations

from typing import Protocol

OUTCOMES = ("succeeded", "failed", "cancelled", "timeout", "shutdown")


class EngineObserver(Protocol):
    def on_submit(self, images: int) -> None: ...

    def on_reject(self, reason: str) -> None:
        """reason: "queue_full", "closed" or "invalid"."""

    def on_step(self, batch_size: int, step_s: float, running_lanes: int, queue_depth: int) -> None: ...

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

    def on_step(self, batch_size: int, step_s: float, running_lanes: int, queue_depth: int) -> None:
        pass

    def on_start(self, queue_wait_s: float) -> None:
        pass

    def on_first_frame(self, seconds: float) -> None:
        pass

    def on_finish(self, outcome: str, latency_s: float) -> None:
        pass
