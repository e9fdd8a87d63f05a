"""What the routes depend on: the app's shared state and the caller's identity.

A leaf below the routes: it imports services (job store, limits, settings), never a route.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from server.api.errors import ApiError
from server.api.limits import OwnerSlots
from server.contract import EngineClient, GenerationSpec, InvalidSpec, RequestLimits, ValidSpec, validate
from server.jobs import JobService
from server.metrics import Metrics
from server.settings import Settings, key_id


@dataclass
class ServerState:
    """Everything the lifespan builds, shared by all routes (app.state.server)."""

    settings: Settings
    engine: EngineClient
    metrics: Metrics
    limits: RequestLimits  # the engine's, from its model_info()
    jobs: JobService
    slots: OwnerSlots

    def accept(self, spec: GenerationSpec) -> ValidSpec:
        """The request checked against the served model (InvalidSpec -> 422), counted if refused."""
        try:
            return validate(spec, self.limits)
        except InvalidSpec:
            self.metrics.observer.on_reject("invalid")
            raise


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
