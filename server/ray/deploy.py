"""The Ray Serve application and `ddpm-serve --backend ray`.

    ingress (FastAPI, num_cpus=0) --handle, streaming--> EngineReplica x N (one device each)
                                  \\-> ReplicaBoard <-- reports --/

Replicas: `num_gpus=1` when the cluster has GPUs (each replica owns one), else `num_cpus` =
their torch threads. Ray's router sends each request to a replica with free slots
(`max_ongoing_requests` = the engine's lanes plus its queue); the autoscaler follows the images
queued and running per replica (images_policy), with a long downscale delay, and a replica
going away first finishes its requests (`graceful_shutdown_timeout_s` above the longest one).
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from server.settings import Settings

from .board import ReplicaBoard
from .ingress import Ingress
from .replica import EngineReplica

APP_NAME = "ddpm"
INGRESS_MAX_ONGOING_REQUESTS = 10_000  # requests (HTTP and WebSocket) one ingress copy takes at once


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and how the autoscaler moves between min and max (fixed when equal)."""

    min_replicas: int = 1
    max_replicas: int = 1
    ingress_copies: int = 1
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 600.0  # a replica keeps its warm weights through lulls
    health_check_period_s: float = 10.0
    stuck_after_s: float = 120.0  # an engine thread silent this long fails its health check

    def __post_init__(self) -> None:
        if not 0 < self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 < min_replicas <= max_replicas, got {self.min_replicas} and {self.max_replicas}")
        if self.ingress_copies < 1:
            raise ValueError(f"ingress_copies must be >= 1, got {self.ingress_copies}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas < self.max_replicas


def images_policy(ctx) -> tuple[float, dict]:
    """Ray Serve autoscaling policy: as many replicas as the images queued and running need, at
    `target_ongoing_requests` images each (Ray applies the delays and bounds around it)."""
    images = sum(ctx.aggregated_metrics.get("images", {}).values())
    return math.ceil(images / ctx.config.get_target_ongoing_requests()), ctx.policy_state


def ingress_options(settings: Settings, scaling: Scaling) -> dict:
    # Ray's default of 5 ongoing requests per deployment replica would hold the 6th client of an
    # ingress copy in Ray's proxy (WebSockets and job followers included); the app's own
    # admission (429 + Retry-After once --max-queue images wait per replica) bounds the work.
    return {"num_replicas": scaling.ingress_copies, "ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS,
            "graceful_shutdown_timeout_s": settings.shutdown_grace_s + 5}


def replica_options(settings: Settings, scaling: Scaling, gpus: bool) -> dict:
    options = {
        "ray_actor_options": {"num_gpus": 1} if gpus else {"num_cpus": settings.torch_threads or 1},
        "max_ongoing_requests": settings.max_batch + settings.max_queue,
        # Ray's default (20 s) would cut a 1000-step request short when a replica is scaled down.
        "graceful_shutdown_timeout_s": settings.request_timeout_s + settings.shutdown_grace_s,
        "health_check_period_s": scaling.health_check_period_s,
        "logging_config": {"enable_access_log": False},
    }
    if not scaling.autoscaling:
        return {**options, "num_replicas": scaling.min_replicas}
    return {**options, "autoscaling_config": {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": scaling.min_replicas,
        "target_ongoing_requests": settings.max_batch,  # in images: one full batch per replica
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        # Deprecated in Ray's AutoscalingConfig (a DeprecationWarning) for two
        # RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S variables that Ray 2.60 defines but does
        # not read yet: this field is still the only one that sets the push interval (default 10 s).
        "metrics_interval_s": 1.0,
        "look_back_period_s": 2.0,
        "policy": {"policy_function": images_policy},
    }}


def absolute_store(settings: Settings) -> Settings:
    """Settings whose job store path means the same file in every Ray worker, whatever its cwd."""
    url = settings.jobs_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        url = prefix + str(Path(url[len(prefix):]).resolve())
    return settings.model_copy(update={"jobs_db": url})


def application(settings: Settings, scaling: Scaling, gpus: bool = False):
    """The bound Serve application: ingress copies over engine replicas and their board."""
    settings = absolute_store(settings)
    quiet = {"enable_access_log": False}  # reports and snapshots, twice a second each
    board = serve.deployment(ReplicaBoard, ray_actor_options={"num_cpus": 0}, logging_config=quiet).bind()
    replicas = serve.deployment(EngineReplica, **replica_options(settings, scaling, gpus)).bind(
        settings, board, scaling.stuck_after_s)
    ingress = serve.deployment(Ingress, **ingress_options(settings, scaling))
    return ingress.bind(settings, replicas, board, scaling.max_replicas)


def app_builder(args: dict):
    """For Serve config files (KubeRay's serveConfigV2): `import_path: server.ray.deploy:app_builder`,
    `args`: Scaling's fields and `gpus` (a GPU per replica); every setting from DDPM_* variables."""
    args = dict(args)
    gpus = bool(args.pop("gpus", False))
    return application(Settings(), Scaling(**args), gpus)


def serve_on_ray(settings: Settings, scaling: Scaling) -> int:
    """Connect to the cluster in RAY_ADDRESS (or start a local one), serve on --host/--port until
    SIGTERM or Ctrl-C, then delete the application: ingresses drain, replicas finish their work."""
    # A local instance runs without Ray's dashboard: on a 2-core machine it took about 8% of the
    # throughput (bench/replicas.py: 0.81 -> 0.90 of one plain process). A cluster in RAY_ADDRESS
    # keeps its own.
    ray.init(namespace="ddpm", log_to_driver=False, include_dashboard=False)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        gpus = ray.cluster_resources().get("GPU", 0) > 0 and settings.device != "cpu"
        serve.run(application(settings, scaling, gpus), name=APP_NAME, route_prefix="/")
        print(f"ddpm-serve: serving on http://{settings.host}:{settings.port} with Ray Serve "
              f"({scaling.min_replicas}..{scaling.max_replicas} replicas)", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
