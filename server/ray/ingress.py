"""The ingress deployment: our FastAPI app (server.app.create_app) over a RemoteEngine.

What it adds to the app, and only on Ray: GET /replicas; the headers X-DDPM-Replica (the
replica that took a response's request: made its images, or, for POST /jobs, accepted the job)
and X-DDPM-Ingress (the ingress copy that answered); and, in /metrics, the engine metrics of
every replica labelled `replica`, in place of the ingress's own (it runs no engine). WebSocket
clients have no response headers: their `queued` and `started` events name the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from ray import serve

from server.api.deps import State, authenticate
from server.app import create_app
from server.contract import EngineObserver
from server.metrics import Metrics, PrometheusObserver
from server.settings import Settings

from .remote import RemoteEngine, Served, served_by
from .replica import ENGINE_METRICS

# POST /jobs answers once the job is stored, before Ray has routed it: its response waits this
# long at most for a replica to accept the job (tens of milliseconds unless every replica is full).
PLACEMENT_WAIT_S = 1.0

replicas_router = APIRouter(tags=["system"], dependencies=[Depends(authenticate)])


@replicas_router.get("/replicas")
async def replicas(state: State) -> list[dict]:
    """The engine replicas: id, node, pid, device, state, queued and running images, requests served."""
    fields = ("id", "node", "pid", "device", "threads", "state", "queued", "running", "served")
    return [{name: replica[name] for name in fields} for replica in state.engine.live_replicas]


class ReplicaMetrics(Collector):
    """The replicas' engine metric families, merged, each sample labelled with its replica."""

    def __init__(self, engine: RemoteEngine):
        self.engine = engine

    def collect(self):
        merged: dict[str, Metric] = {}
        for replica in self.engine.live_replicas:
            for family in replica["metrics"]:
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "replica": replica["id"]}, sample.value,
                                    sample.timestamp, sample.exemplar)
        yield from merged.values()


class ReplicaHeaders:
    """ASGI middleware: X-DDPM-Ingress on every response, X-DDPM-Replica on those whose request a
    replica took (the request's run names it in the Served it inherits; see remote.served_by).
    A response ready before its run was placed (POST /jobs) waits up to PLACEMENT_WAIT_S for it.
    The headers go out with the first body chunk: an event stream submits its request after its
    headers are ready, and sends a first chunk (a comment) once it has."""

    def __init__(self, app: Any, ingress: str):
        self.app, self.ingress = app, ingress

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served = Served()
        served_by.set(served)
        held_start: dict | None = None

        async def send_with_headers(message):
            nonlocal held_start
            if message["type"] == "http.response.start":
                held_start = message
                return
            if held_start is not None:
                start, held_start = held_start, None
                await send(await self.with_headers(start, served))
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def with_headers(self, start: dict, served: Served) -> dict:
        if served.submitted and not served.settled.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(served.settled.wait(), PLACEMENT_WAIT_S)
        headers = [*start.get("headers", []), (b"x-ddpm-ingress", self.ingress.encode())]
        if served.replica is not None:
            headers.append((b"x-ddpm-replica", served.replica.encode()))
        return {**start, "headers": headers}


def remote_engine_factory(replicas: Any, board: Any, max_replicas: int):
    def build(settings: Settings, observer: EngineObserver) -> RemoteEngine:
        engine = RemoteEngine(replicas, board, observer, max_attempts=settings.job_max_attempts,
                              max_replicas=max_replicas, grace_s=settings.shutdown_grace_s)
        if isinstance(observer, PrometheusObserver):  # the replicas' metrics replace the ingress's idle ones
            swap_engine_metrics(observer.m, engine)
        return engine

    return build


def swap_engine_metrics(metrics: Metrics, engine: RemoteEngine) -> None:
    for name in ENGINE_METRICS:
        metrics.registry.unregister(getattr(metrics, name))
    metrics.registry.register(ReplicaMetrics(engine))


@serve.ingress()
class Ingress:
    """One ingress copy. Its job-store name is unique, so that copies never take each other's jobs
    for their own; a dead copy's jobs are taken over by another once their lease runs out."""

    def __init__(self, settings: Settings, replicas: Any, board: Any, max_replicas: int):
        self.name = serve.get_replica_context().replica_id.unique_id
        self.settings = settings.model_copy(update={"worker_id": f"{settings.worker_name}/{self.name}"})
        self.factory = remote_engine_factory(replicas, board, max_replicas)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, engine_factory=self.factory)
        app.include_router(replicas_router)
        app.add_middleware(ReplicaHeaders, ingress=self.name)
        return app
