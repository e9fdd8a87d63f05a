"""EngineReplica: a Ray Serve replica that owns one device and runs the step-level Engine.

It loads the weights once, streams each request's events back to the ingress (first a
Placement naming itself, or a Refusal), reports its load to the ReplicaBoard and to Ray's
autoscaler, and fails Ray's health check when its engine thread is dead or stuck, so that Ray
replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from model.threads import sleep_idle_threads
from server.contract import Done, EngineError, EngineObserver, GenerationSpec, QueueFull, validate
from server.metrics import Metrics
from server.settings import Settings

from .remote import Placement, Refusal

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5
# The engine's attributes in server.metrics.Metrics that replicas own: the ingress shows them
# labelled by replica, in place of its own.
ENGINE_METRICS = ("queue_depth", "running_lanes", "batch_size", "step_seconds", "queue_wait_seconds",
                  "first_frame_seconds", "request_seconds", "images_submitted", "requests_finished")


class Heartbeat:
    """The engine's observer, passed on to `inner`, noting when the engine last iterated: it
    does after every step and, when idle, every quarter second."""

    def __init__(self, inner: EngineObserver):
        self.inner = inner
        self.last = time.monotonic()

    def on_load(self, running_lanes: int, queue_depth: int) -> None:
        self.last = time.monotonic()
        self.inner.on_load(running_lanes, queue_depth)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class EngineReplica:
    async def __init__(self, settings: Settings, board: Any, stuck_after_s: float):
        sleep_idle_threads()  # before torch loads, as ddpm-serve does
        from server.app import load_model, reserve_cores_for_engine
        from server.engine import Engine

        threads = reserve_cores_for_engine(settings)
        self.metrics = Metrics()
        self.heartbeat = Heartbeat(self.metrics.observer)
        self.engine = Engine(load_model(settings), settings.engine_config(threads), self.heartbeat)
        await self.engine.start()
        self.board, self.stuck_after_s = board, stuck_after_s
        self.name = serve.get_replica_context().replica_id.unique_id
        info = self.engine.model_info()
        self.identity = {"id": self.name, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                         "device": info.device, "threads": info.threads}
        self.served = 0
        self.draining = False
        self.reporter = asyncio.create_task(self.report_forever())

    async def generate(self, fields: dict) -> AsyncIterator[Any]:
        """Placement, then the request's events; or one Refusal. Cancelling the call (the
        client left, or the ingress cancelled) cancels the request in the engine."""
        spec = validate(GenerationSpec(**fields), self.engine.limits)
        try:
            handle = self.engine.submit(spec)
        except EngineError as exc:
            yield Refusal(str(exc), exc.retry_after_s if isinstance(exc, QueueFull) else 0.0)
            return
        yield Placement(self.name)
        try:
            async for event in handle.events():
                self.served += isinstance(event, Done)
                yield event
        finally:
            self.engine.cancel(handle.id)  # a no-op once it has ended

    def model_info(self):
        return self.engine.model_info()

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; an exception marks the replica unhealthy."""
        if not self.engine.ready and not self.draining:
            raise RuntimeError("the engine thread is dead")
        silent_s = time.monotonic() - self.heartbeat.last
        if silent_s > self.stuck_after_s:
            raise RuntimeError(f"the engine thread is stuck: no iteration for {silent_s:.0f}s")

    def load(self) -> int:
        stats = self.engine.stats()
        return stats["queue_depth"] + stats["running_lanes"]

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray's autoscaler reads this (server.ray.deploy.images_policy): images, not requests."""
        return {"images": float(self.load())}

    def stats(self) -> dict:
        stats = self.engine.stats()
        families = [family for name in ENGINE_METRICS for family in getattr(self.metrics, name).collect()]
        return {**self.identity, "state": "draining" if self.draining else "running",
                "queued": stats["queue_depth"], "running": stats["running_lanes"], "served": self.served,
                "steps_per_s": stats["steps_per_s"], "metrics": families}

    async def report_forever(self) -> None:
        while True:
            try:
                await self.board.report.remote(self.stats())
            except Exception:  # the board restarts with Ray; reports resume then
                log.warning("cannot report to the replica board", exc_info=True)
            await asyncio.sleep(REPORT_EVERY_S)

    async def __del__(self) -> None:
        """Ray calls this once ongoing requests have finished (or graceful_shutdown_timeout_s passed)."""
        self.draining = True
        await self.engine.shutdown()
        self.reporter.cancel()  # the board forgets a replica that stopped reporting
