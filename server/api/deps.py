"""What the routes depend on: the app's shared state, the caller's identity, per-key limits."""

from __future__ import annotations

import hmac
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from server.api.errors import ApiError
from server.api.schemas import ModelLimits
from server.metrics import Metrics
from server.settings import Settings, key_id

if TYPE_CHECKING:
    from server.api.jobs import JobStore
    from server.engine import Engine


class OwnerSlots:
    """At most `limit` open requests per API key (generations, streams and unfinished jobs)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Counter[str] = Counter()

    def acquire(self, owner: str | None) -> None:
        if owner is None:  # no API keys configured: the engine's queue is the only limit
            return
        if self.open[owner] >= self.limit:
            raise ApiError(429, "too_many_requests", f"at most {self.limit} open requests per API key",
                           {"Retry-After": "1"})
        self.open[owner] += 1

    def release(self, owner: str | None) -> None:
        if owner is not None:
            self.open[owner] -= 1
            if self.open[owner] <= 0:
                del self.open[owner]

    @contextmanager
    def hold(self, owner: str | None) -> Iterator[None]:
        self.acquire(owner)
        try:
            yield
        finally:
            self.release(owner)


@dataclass
class ServerState:
    """Everything the lifespan builds, shared by all routes (app.state.server)."""

    settings: Settings
    engine: Engine | Any  # the real Engine, or any object with its client interface (tests)
    metrics: Metrics
    limits: ModelLimits
    jobs: JobStore
    slots: OwnerSlots


def get_state(connection: HTTPConnection) -> ServerState:
    return connection.app.state.server


State = Annotated[ServerState, Depends(get_state)]


def identify(settings: Settings, presented: str | None) -> str | None:
    """The caller's key id, None when auth is off; ApiError(401) for a missing or unknown key.

    Every configured key is compared, in constant time, so timing reveals neither which key
    matched nor how much of one did."""
    if not settings.auth_enabled:
        return None
    presented_bytes = (presented or "").encode()
    matched = None
    for key in settings.api_keys:
        if hmac.compare_digest(presented_bytes, key.encode()):
            matched = key
    if matched is None:
        raise ApiError(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>",
                       {"WWW-Authenticate": "Bearer"})
    return key_id(matched)


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, credentials = (authorization or "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


bearer_scheme = HTTPBearer(auto_error=False, description="one of the server's DDPM_API_KEYS")


def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> str | None:
    return identify(get_state(request).settings, credentials.credentials if credentials else None)


Owner = Annotated[str | None, Depends(authenticate)]
