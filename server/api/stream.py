"""WS /ws/generate: one generation per connection, with live events and preview frames.

    client -> {"n": 2, "steps": 50, "preview_every": 5, ...}     (StreamRequest)
    server -> queued, started, progress..., frame..., done | error, then closes
    client -> {"type": "cancel"} at any time; closing the socket also cancels.

With API keys: `Authorization: Bearer <key>`, or (browsers) the subprotocols "ddpm" and
"bearer.<base64url(key)>"; never in the URL.

A malformed message gets an `error` event and a 1008 (policy violation) close.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.responses import JSONResponse

from server.api.deps import ServerState, State, bearer_token, identify
from server.api.errors import ApiError, api_error_for, describe_validation_errors, error_json
from server.api.schemas import StreamRequest
from server.contract import Done, EngineError, Event, Failed, InvalidSpec, RequestHandle, event_json

log = logging.getLogger(__name__)
router = APIRouter(tags=["stream"])

FIRST_MESSAGE_TIMEOUT_S = 30.0
# RFC 6455 close codes
NORMAL, GOING_AWAY, POLICY_VIOLATION, TRY_AGAIN_LATER = 1000, 1001, 1008, 1013


# Browsers cannot set headers on a WebSocket, and a key in the URL ends up in access logs: the
# page offers the subprotocols "ddpm" and "bearer.<base64url(key)>", and the server selects "ddpm".
SUBPROTOCOL = "ddpm"
KEY_SUBPROTOCOL_PREFIX = "bearer."


def subprotocol_key(offered: list[str]) -> str | None:
    for protocol in offered:
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            encoded = protocol.removeprefix(KEY_SUBPROTOCOL_PREFIX)
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (ValueError, UnicodeDecodeError):
                return None  # not a key we could have issued: refused as unknown
    return None


class ProtocolError(Exception):
    """The client sent something that is not this protocol."""


class SlowClient(Exception):
    """The client stopped reading: what we send no longer leaves this machine."""


@router.websocket("/ws/generate")
async def stream(websocket: WebSocket, state: State) -> None:
    try:
        owner = websocket_owner(websocket, state)
    except ApiError as exc:
        await deny(websocket, exc)
        return
    await accept(websocket)
    with state.metrics.websockets_open.track_inprogress():
        await serve_stream(websocket, state, owner)


def websocket_owner(websocket: WebSocket, state: ServerState) -> str | None:
    """The caller's key id (None without keys); ApiError(401) for a missing or unknown key."""
    offered = websocket.scope.get("subprotocols", [])
    presented = bearer_token(websocket.headers.get("authorization")) or subprotocol_key(offered)
    return identify(state.settings, presented)


async def accept(websocket: WebSocket) -> None:
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)


async def serve_stream(websocket: WebSocket, state: ServerState, owner: str | None) -> None:
    """One accepted connection: the request, its events, its end."""
    try:
        request = await receive_request(websocket, state.settings.max_body_bytes)
        spec = state.accept(request.to_spec(owner, state.settings.default_preview_every, state.limits.image_shape))
        with state.slots.hold(owner):
            handle = state.engine.submit(spec)
            await relay(websocket, handle, state.settings.max_body_bytes, state.settings.ws_send_timeout_s)
    except ProtocolError as exc:
        await send_error_and_close(websocket, "invalid_request", str(exc), POLICY_VIOLATION)
    except (ApiError, EngineError, InvalidSpec) as exc:
        error = exc if isinstance(exc, ApiError) else api_error_for(exc)
        await send_error_and_close(websocket, error.code, error.message, close_code_for(error))
    except WebSocketDisconnect:
        pass  # the client left; relay has cancelled its request
    except SlowClient as exc:  # relay has cancelled its request; its buffers are full, so no goodbye
        log.warning("dropping a WebSocket client: %s", exc)


async def deny(websocket: WebSocket, error: ApiError) -> None:
    """Refuse the handshake with the HTTP status where the server can send one, else close 1008."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response = JSONResponse(error_json(error.code, error.message), error.status, headers=error.headers)
        await websocket.send_denial_response(response)
    else:
        await websocket.close(POLICY_VIOLATION, error.message)


async def receive_request(websocket: WebSocket, max_bytes: int) -> StreamRequest:
    try:
        text = await asyncio.wait_for(receive_text(websocket, max_bytes), FIRST_MESSAGE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ProtocolError(f"no request within {FIRST_MESSAGE_TIMEOUT_S:.0f}s of connecting") from None
    try:
        return StreamRequest.model_validate_json(text)
    except ValidationError as exc:
        raise ProtocolError(describe_validation_errors(exc.errors())) from None


async def receive_text(websocket: WebSocket, max_bytes: int) -> str:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", NORMAL))
    text = message.get("text")
    if text is None:
        raise ProtocolError("send JSON text messages, not binary")
    if len(text) > max_bytes:
        raise ProtocolError(f"message of {len(text)} bytes; the limit is {max_bytes}")
    return text


async def relay(websocket: WebSocket, handle: RequestHandle, max_bytes: int, send_timeout_s: float) -> None:
    """Forward the engine's events while listening for cancel; either side ending ends both."""
    forward = asyncio.ensure_future(forward_events(websocket, handle.events(), send_timeout_s))
    listen = asyncio.ensure_future(listen_for_cancel(websocket, handle, max_bytes))
    try:
        finished, _ = await asyncio.wait({forward, listen}, return_when=asyncio.FIRST_COMPLETED)
        if forward not in finished:  # the client left or broke the protocol: stop the work too
            handle.cancel()
            listen.result()  # raises WebSocketDisconnect or ProtocolError
        await forward
    finally:
        for task in (forward, listen):
            task.cancel()
        handle.cancel()  # a no-op once finished; frees the lanes if we got here any other way


async def forward_events(websocket: WebSocket, events: AsyncIterator[Event], send_timeout_s: float) -> None:
    """Send each event; close after the last (1001 for a shutdown, else 1000)."""
    async for event in events:
        try:
            await asyncio.wait_for(websocket.send_json(event_json(event)), send_timeout_s)
        except asyncio.TimeoutError:
            raise SlowClient(f"the client read nothing for {send_timeout_s:g}s") from None
        if isinstance(event, Failed):
            await websocket.close(GOING_AWAY if event.code == "shutdown" else NORMAL)
        elif isinstance(event, Done):
            await websocket.close(NORMAL)


async def listen_for_cancel(websocket: WebSocket, handle: RequestHandle, max_bytes: int) -> None:
    while True:
        text = await receive_text(websocket, max_bytes)
        try:
            message = json.loads(text)
        except ValueError:
            raise ProtocolError("not JSON") from None
        if message != {"type": "cancel"}:
            raise ProtocolError('after the request, the only message is {"type": "cancel"}')
        handle.cancel()  # the engine ends the stream with an error event, code "cancelled"


def close_code_for(error: ApiError) -> int:
    if error.status == 429:
        return TRY_AGAIN_LATER
    if error.status == 503:
        return GOING_AWAY
    return POLICY_VIOLATION


async def send_error_and_close(websocket: WebSocket, code: str, message: str, close_code: int) -> None:
    try:
        await websocket.send_json(event_json(Failed(id=None, code=code, message=message)))
        await websocket.close(close_code)
    except (WebSocketDisconnect, RuntimeError):
        pass  # already gone or already closed
