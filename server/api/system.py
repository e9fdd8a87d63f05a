"""The server's own routes: liveness, readiness, metrics, the served model, the web page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import State, authenticate
from server.api.schemas import ErrorResponse
from server.contract import SAMPLER_NAMES, GenerationSpec, default_steps

STATIC = Path(__file__).resolve().parents[1] / "static"

public = APIRouter(tags=["system"])
protected = APIRouter(tags=["system"], dependencies=[Depends(authenticate)], responses={401: {"model": ErrorResponse}})


@public.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The live web page; it asks for an API key itself when the server needs one."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@public.get("/healthz")
async def healthz() -> dict:
    """Alive: the process answers."""
    return {"status": "ok"}


@public.get("/readyz", responses={503: {"description": "not ready (starting or shutting down)"}})
async def readyz(state: State) -> JSONResponse:
    """Ready: the model is loaded and the engine admits work."""
    ready = state.engine.ready
    return JSONResponse({"status": "ready" if ready else "unavailable"}, status_code=200 if ready else 503)


@protected.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@protected.get("/models")
async def models(state: State) -> dict:
    """The served model: config, size, image shape, samplers, defaults and limits."""
    settings, info = state.settings, state.engine.model_info()
    engine_limits = ("max_batch", "max_queue", "max_preview_fps", "default_timeout_s")
    return {
        "id": settings.weights.name,
        **info.model_dump(mode="json", exclude={"limits", *engine_limits}),
        "limits": {
            **info.model_dump(include=set(engine_limits)),
            "max_images_per_request": info.limits.max_images_per_request,
            "max_steps": info.limits.num_timesteps,
            "max_concurrent_per_key": settings.max_concurrent_per_key if settings.auth_enabled else None,
            "max_body_bytes": settings.max_body_bytes,
        },
        "defaults": {"n": GenerationSpec.n, "sampler": GenerationSpec.sampler,
                     "steps": default_steps(GenerationSpec.sampler, info.num_timesteps),
                     "steps_by_sampler": {name: default_steps(name, info.num_timesteps) for name in SAMPLER_NAMES},
                     "eta": GenerationSpec.eta, "preview_every": settings.default_preview_every},
        "auth_required": settings.auth_enabled,
    }
