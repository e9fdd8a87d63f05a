"""create_app(settings): the FastAPI app. Its lifespan loads the weights, starts the engine, and on
shutdown drains it (running work finishes within `shutdown_grace_s`; new work gets 503).

    uvicorn --factory server.app:create_app      # settings from DDPM_* variables
    ddpm-serve --weights my.safetensors          # the same, with flags (server/cli.py)
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api import ROUTERS, openai
from server.api.deps import ServerState
from server.api.docs import install_docs
from server.api.errors import install_error_handlers
from server.api.limits import OwnerSlots
from server.api.middleware import BodySizeLimit, HttpMetrics
from server.contract import EngineClient, EngineObserver
from server.jobs import JobRepository, JobService, open_repository
from server.metrics import Metrics
from server.settings import Settings

if TYPE_CHECKING:
    import model

log = logging.getLogger(__name__)

# (settings, observer) -> an engine. The real one by default; tests pass a fake.
EngineFactory = Callable[[Settings, EngineObserver], EngineClient]


class StartupError(RuntimeError):
    """The server cannot start (missing or unreadable weights...); the message is one line."""


def usable_device(name: str) -> str:
    """The device to serve on (auto: cuda if this torch sees a GPU, else cpu), or a StartupError
    that names the device problem, before any weights are read."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StartupError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"device {name!r}, but this torch {torch.__version__} sees no CUDA GPU "
                               f"(a CPU-only build, no GPU visible, or a driver older than its CUDA)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StartupError(f"device {name!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise StartupError(f"device {name!r}, but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise StartupError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return name


def load_model(settings: Settings) -> model.DDPM:
    import model  # torch loads here, not when the API modules are imported

    path = settings.weights
    if not path.exists():
        raise StartupError(f"weights not found: {path} (set --weights or DDPM_WEIGHTS)")
    device = usable_device(settings.device)
    try:
        return model.load(path, device, settings.dtype)
    except Exception as exc:  # any failure to read a user's file is a start-up error, not a traceback
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"cannot load weights {path}: {reason}") from exc


def reserve_cores_for_engine(settings: Settings) -> int:
    """The engine thread's torch thread count; from now on every other thread uses one.

    Call it before any torch work. GNU OpenMP stops spin-waiting once a process has more
    OpenMP threads than cores, so a second thread team (say, the main thread's, made while
    loading the weights) made the engine thread's small U-Net calls run serially: 13.6 ms
    instead of 7.4 ms per batch-1 call of the shipped model on 2 cores."""
    import torch

    threads = settings.torch_threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def real_engine_factory(ddpm: model.DDPM | None = None, torch_threads: int | None = None) -> EngineFactory:
    """Build the real engine around `ddpm`, or around the weights the settings name."""

    def build(settings: Settings, observer: EngineObserver) -> EngineClient:
        from server.engine import Engine  # torch and the model load here, not with the API

        threads = torch_threads
        if ddpm is None:
            threads = reserve_cores_for_engine(settings)
        return Engine(ddpm or load_model(settings), settings.engine_config(threads), observer)

    return build


async def drain(app: FastAPI) -> None:
    """Stop taking work and let running work finish within the grace period (see cli.DrainingServer);
    returns once every accepted request has ended and its handler has had a moment to answer."""
    state: ServerState = app.state.server
    await state.engine.shutdown(state.settings.shutdown_grace_s)
    await asyncio.sleep(0.1)  # let the routes write the outcomes the engine just delivered


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None,
               repository: JobRepository | None = None) -> FastAPI:
    """The app; its lifespan starts the engine and opens the job store (`repository`, or the
    one settings.jobs_url names), and recovers the jobs a previous process left unfinished."""
    settings = settings or Settings()
    engine_factory = engine_factory or real_engine_factory()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = repository or open_repository(settings.jobs_url)
        engine = engine_factory(settings, metrics.observer)
        await engine.start()
        slots = OwnerSlots(settings.max_concurrent_per_key)
        info = engine.model_info()
        jobs = JobService(metrics.watch_jobs(store), engine, info.limits, durable=store.durable,
                          ttl_s=settings.job_ttl_s, max_jobs=settings.max_jobs, max_bytes=settings.jobs_max_bytes,
                          max_attempts=settings.job_max_attempts, worker=settings.worker_name,
                          lease_s=settings.job_lease_s, slots=slots)
        app.state.server = ServerState(settings, engine, metrics, info.limits, jobs, slots)
        recovered = jobs.recover()
        metrics.jobs_recovered.inc(recovered)
        jobs.keep_leases(on_recovered=metrics.jobs_recovered.inc)
        if recovered:
            log.info("recovered %d unfinished jobs from %s", recovered, settings.jobs_url)
        log.info("serving %s: %s %s, %.2fM parameters, T=%d, on %s in %s with %d torch threads; max batch %d, "
                 "%s batching; jobs in %s", settings.weights, info.dataset or "model",
                 "x".join(map(str, info.image_shape)), info.num_parameters / 1e6, info.num_timesteps, info.device,
                 info.dtype, info.threads, info.max_batch, info.policy, settings.jobs_url)
        try:
            yield
        finally:
            await engine.shutdown(settings.shutdown_grace_s)
            await jobs.close()

    app = FastAPI(
        title="ddpm-serve",
        summary="Denoising diffusion (Ho et al. 2020) as a service: batched steps, live previews.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # install_docs serves them, with local assets
        redoc_url=None,
    )
    for router in ROUTERS:
        app.include_router(router)
    install_docs(app, settings)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, upload_paths=openai.UPLOAD_PATHS,
                       max_upload_bytes=openai.MAX_UPLOAD_BODY_BYTES)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
        )
    app.add_middleware(HttpMetrics, metrics=metrics)  # outermost: it also sees 413s and CORS refusals
    return app
