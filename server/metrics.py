"""Prometheus metrics in one place: the engine's (through its observer hooks) and HTTP's.

Each app gets its own CollectorRegistry, so tests can build many apps in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.jobs import JobRepository

# Seconds, from a fast tiny-model step on a GPU to a long 1000-step request on a CPU.
TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Owns the registry; `observer` is the engine's EngineObserver, `observe_http` the middleware's hook."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)  # python_info
        self.websockets_open = Gauge("ddpm_websockets_open", "Open WebSocket connections.", registry=r)
        self.queue_depth = Gauge("ddpm_queue_depth_images", "Images waiting to be admitted.", registry=r)
        self.running_lanes = Gauge("ddpm_running_lanes", "Images being denoised.", registry=r)
        self.batch_size = Histogram(
            "ddpm_batch_size", "Images per U-Net call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "ddpm_step_seconds", "Time of one batched denoising step.", buckets=TIME_BUCKETS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "ddpm_queue_wait_seconds", "Submission to first step.", buckets=TIME_BUCKETS, registry=r
        )
        self.first_frame_seconds = Histogram(
            "ddpm_time_to_first_frame_seconds", "Submission to first preview frame.", buckets=TIME_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "ddpm_request_seconds", "Submission to end, by outcome.", ["outcome"], buckets=TIME_BUCKETS, registry=r
        )
        self.images_submitted = Counter("ddpm_images_submitted", "Images accepted by the engine.", registry=r)
        self.requests_finished = Counter(
            "ddpm_requests_finished", "Finished requests by outcome.", ["outcome"], registry=r
        )
        self.requests_rejected = Counter(
            "ddpm_requests_rejected", "Requests the engine refused, by reason.", ["reason"], registry=r
        )
        self.http_requests = Counter(
            "ddpm_http_requests", "HTTP requests by route template and status.", ["method", "route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "ddpm_http_request_seconds", "HTTP request latency by route template.", ["method", "route"],
            buckets=TIME_BUCKETS, registry=r,
        )
        self.jobs_recovered = Counter(
            "ddpm_jobs_recovered", "Unfinished jobs put back in the queue at start-up.", registry=r
        )
        self.job_store_seconds = Histogram(
            "ddpm_job_store_seconds", "Job store calls by operation.", ["operation"], buckets=TIME_BUCKETS, registry=r
        )
        self.observer = PrometheusObserver(self)

    def watch_jobs(self, repository: "JobRepository") -> "JobRepository":
        """`repository` timed call by call (ddpm_job_store_seconds), and its jobs counted by status
        at every scrape (ddpm_jobs); returns the timed repository to use."""
        self.registry.register(JobsByStatus(repository))
        return TimedRepository(repository, self.job_store_seconds)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PrometheusObserver:
    """The engine's EngineObserver protocol, feeding `Metrics`. Called from the engine thread;
    prometheus-client's metrics are thread-safe."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def on_submit(self, images: int) -> None:
        self.m.images_submitted.inc(images)

    def on_reject(self, reason: str) -> None:
        self.m.requests_rejected.labels(reason).inc()

    def on_step(self, batch_size: int, step_s: float) -> None:
        self.m.batch_size.observe(batch_size)
        self.m.step_seconds.observe(step_s)

    def on_load(self, running_lanes: int, queue_depth: int) -> None:
        self.m.running_lanes.set(running_lanes)
        self.m.queue_depth.set(queue_depth)

    def on_start(self, queue_wait_s: float) -> None:
        self.m.queue_wait_seconds.observe(queue_wait_s)

    def on_first_frame(self, seconds: float) -> None:
        self.m.first_frame_seconds.observe(seconds)

    def on_finish(self, outcome: str, latency_s: float) -> None:
        self.m.requests_finished.labels(outcome).inc()
        self.m.request_seconds.labels(outcome).observe(latency_s)



class JobsByStatus(Collector):
    """ddpm_jobs{status}: read from the store at each scrape, so it is right after a restart too."""

    def __init__(self, repository: "JobRepository"):
        self.repository = repository

    def collect(self):
        family = GaugeMetricFamily("ddpm_jobs", "Stored jobs by status.", labels=["status"])
        counts = self.repository.counts()
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            family.add_metric([status], counts.get(status, 0))
        yield family


class TimedRepository:
    """A job store whose every call is observed in a histogram labelled by the call's name."""

    def __init__(self, repository: "JobRepository", seconds: Histogram):
        self.repository, self.seconds = repository, seconds

    def __getattr__(self, name: str):
        method = getattr(self.repository, name)
        if not callable(method):
            return method

        def timed(*args, **kwargs):
            with self.seconds.labels(name).time():
                return method(*args, **kwargs)

        return timed
