"""Every failure the API reports, as {"error": {"code", "message"}} with the right status.

Engine errors map here once (`api_error_for`), for both HTTP and WebSocket, so a client sees the
same code whichever way it asked.
"""

from __future__ import annotations

import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.contract import EngineClosed, EngineError, GenerationFailed, InvalidSpec, QueueFull
from server.jobs import JobNotFound, StoreError, TooManyJobs

# Why a generation ended without images -> HTTP status. 499: the client closed the request (nginx).
FAILURE_STATUS = {"cancelled": 499, "timeout": 504, "shutdown": 503, "out_of_memory": 503, "device_error": 503,
                  "replica_lost": 503, "internal": 500}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_json(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def api_error_for(exc: Exception) -> ApiError:
    """Map what submit/result/limits raise to the error the client gets."""
    if isinstance(exc, QueueFull):
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        return ApiError(429, "queue_full", str(exc), {"Retry-After": retry_after})
    if isinstance(exc, EngineClosed):
        return ApiError(503, "shutdown", "the server is shutting down; retry on another replica")
    if isinstance(exc, InvalidSpec):
        return ApiError(422, "invalid_request", str(exc))
    if isinstance(exc, GenerationFailed):
        failure = exc.failure
        return ApiError(FAILURE_STATUS.get(failure.code, 500), failure.code, failure.message)
    if isinstance(exc, EngineError):
        return ApiError(503, "unavailable", str(exc))
    if isinstance(exc, JobNotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, TooManyJobs):
        return ApiError(429, "too_many_jobs", str(exc), {"Retry-After": "5"})
    if isinstance(exc, StoreError):
        return ApiError(503, "store_unavailable", f"the job store failed; nothing was stored: {exc}")
    raise TypeError(f"not an API error: {exc!r}") from exc


def describe_validation_errors(errors: list[dict], whole: str = "body") -> str:
    """'n: Input should be less than or equal to 16; seed: ...' naming each field as the client spelled it
    (`whole` names what an error about no field in particular is about)."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path"))
        parts.append(f"{location or whole}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_json(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    async def on_engine_error(request: Request, exc: Exception) -> JSONResponse:
        return await on_api_error(request, api_error_for(exc))

    for error_class in (EngineError, InvalidSpec, GenerationFailed, JobNotFound, TooManyJobs, StoreError):
        app.add_exception_handler(error_class, on_engine_error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_json("invalid_request", describe_validation_errors(exc.errors())), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, headers = exc.status_code, exc.headers
        if status == 400:  # FastAPI could not decode the body (not UTF-8): bad input like any other
            status = 422
        elif status == 405 and (allowed := documented_methods(request)):
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}  # Starlette names one route's
        code = HTTP_ERROR_CODES.get(status, "http_error")
        return JSONResponse(error_json(code, str(exc.detail)), status_code=status, headers=headers)


HTTP_ERROR_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
                    422: "invalid_request"}


def documented_methods(request: Request) -> set[str]:
    """Every method the OpenAPI schema documents at this request's path (GET brings HEAD)."""
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), request.url.path):
            methods = {method.upper() for method in operations}
            return methods | {"HEAD"} if "GET" in methods else methods
    return set()
