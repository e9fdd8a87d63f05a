"""POST /generate: wait for the images and return them (OpenAI images shape, or one PNG)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from server.api.deps import Owner, State
from server.api.errors import ApiError
from server.api.schemas import ErrorResponse, GenerateRequest
from server.contract import Done, RequestHandle

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    response_model=Done,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself with Accept: image/png and n=1"},
        401: {"model": ErrorResponse},
        406: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        429: {"model": ErrorResponse, "description": "queue full, or too many open requests for this key"},
        503: {"model": ErrorResponse, "description": "shutting down"},
    },
)
async def generate(body: GenerateRequest, request: Request, state: State, owner: Owner) -> Response:
    """Generate n images and wait for them. A client that disconnects cancels its request."""
    want_png = prefers_png(request.headers.get("accept", ""))
    if want_png and body.n != 1:
        raise ApiError(406, "not_acceptable", "Accept: image/png returns one image; ask for n=1 or accept JSON")
    spec = state.accept(body.to_spec(owner, image_shape=state.limits.image_shape))
    with state.slots.hold(owner):
        handle = state.engine.submit(spec)
        done = await result_unless_disconnected(handle, request)
    if want_png:
        image = done.images[0]
        return Response(image.png, media_type="image/png",
                        headers={"X-Request-Id": done.id, "X-Seed": str(image.seed)})
    return Response(done.model_dump_json(by_alias=True), media_type="application/json")


def prefers_png(accept: str) -> bool:
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return "image/png" in types and "application/json" not in types


async def result_unless_disconnected(handle: RequestHandle, request: Request) -> Done:
    """The request's result; if the client goes away first, cancel it so its lanes are freed."""
    result = asyncio.ensure_future(handle.result())
    disconnected = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({result, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not result.done():  # the client left (or this task was cancelled)
            handle.cancel()
            result.add_done_callback(retrieve_exception)  # nobody may await it: no "never retrieved" log
    return await result


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the only message left to come is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def retrieve_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
