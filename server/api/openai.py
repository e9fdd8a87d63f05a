"""The OpenAI Images API under /v1, so that OpenAI clients and SDKs work unchanged.

    POST /v1/images/generations   JSON       from noise
    POST /v1/images/variations    multipart  SDEdit at `strength` (default 0.75)
    POST /v1/images/edits         multipart  inpainting: the mask's (or the image's own) transparent pixels

OpenAI's field names and response shape (`created`, `data[].b64_json`); the API key as
`Authorization: Bearer`. The model is unconditional: `prompt` is accepted and ignored, and the
response says so (`revised_prompt` is empty, `ignored` names it). Options with no meaning here
(quality, style, background, ...) are accepted and reported as ignored too. Extra fields
through the SDK's `extra_body`: seed, steps, sampler, eta, strength (variations), jump_length and
jump_n_sample (edits: RePaint's resampling). `size` must be the model's
(or "auto"); `response_format: url` is refused, as this server keeps no files to link to.
`stream: true` (generations and edits) answers with OpenAI's server-sent events, the partial
images being our x0 previews.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from server.api.deps import Owner, ServerState, State
from server.api.errors import ApiError, api_error_for
from server.api.generate import result_unless_disconnected
from server.api.images import MAX_UPLOAD_BYTES, as_picture, keep_mask, open_image, own_alpha_keep, picture
from server.api.schemas import (
    ETA_ONLY_WITH_DDIM,
    JUMP_LENGTH_DESCRIPTION,
    JUMP_N_SAMPLE_DESCRIPTION,
    ErrorResponse,
    JsonInt,
    bounds,
)
from server.contract import (Done, EngineError, Frame, GeneratedImage, GenerationSpec, InvalidSpec, SamplerName,
                             ValidSpec)
from server.contract.events import Failed
from server.contract.sources import DEFAULT_JUMP_LENGTH, DEFAULT_STRENGTH, Source
from server.contract.spec import ETA_RANGE, MAX_SEED, default_steps

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound
IGNORED_OPTIONS = ("quality", "style", "background", "moderation", "output_compression", "input_fidelity")
ERRORS = {status: {"model": ErrorResponse} for status in (401, 413, 422, 429, 503)}
UPLOAD_PATHS = ("/v1/images/variations", "/v1/images/edits")
STREAMING = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                   "description": "OpenAI's images response, or its server-sent events with stream: true"}}
MAX_UPLOAD_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + 64 * 1024  # an image, a mask and the form fields


# check_options' cross-field rule, stated in the schema: partial_images only with stream: true
# (stream is false when absent).
PARTIAL_IMAGES_ONLY_WHEN_STREAMING = {
    "if": {"properties": {"stream": {"const": False}}},
    "then": {"properties": {"partial_images": {"const": 0}}},
}


def cross_field_rules(schema: dict, model: type[BaseModel]) -> None:
    """The rules a body must keep beyond each field's own type and range, in `model`'s schema, so
    that it admits only what the server accepts."""
    rules = [ETA_ONLY_WITH_DDIM]
    if issubclass(model, StreamOptions):
        rules.append(PARTIAL_IMAGES_ONLY_WHEN_STREAMING)
    schema["allOf"] = rules


class ImageOptions(BaseModel):
    """What the three routes share: OpenAI's fields, then ours (the SDK's extra_body)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=cross_field_rules)

    prompt: str | None = Field(None, description="accepted and ignored: the model is unconditional")
    model: str | None = Field(None, description="accepted; this server serves one model")
    n: JsonInt = Field(1, json_schema_extra=bounds(1))
    size: str | None = Field(None, description='the model\'s size, e.g. "28x28", or "auto"')
    # "url" is parsed so that its refusal can say why; the schema offers only what is served.
    response_format: Literal["b64_json", "url"] = Field("b64_json", json_schema_extra={"enum": ["b64_json"]})
    output_format: Literal["png"] = "png"
    user: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: JsonInt | None = None
    input_fidelity: str | None = None
    seed: JsonInt | None = Field(None, json_schema_extra=bounds(0, MAX_SEED))
    steps: JsonInt | None = Field(None, json_schema_extra=bounds(1))
    sampler: SamplerName = "ddpm"
    eta: float = Field(0.0, json_schema_extra=bounds(*ETA_RANGE))

    def ignored(self) -> list[str]:
        return [name for name in ("prompt", *IGNORED_OPTIONS) if getattr(self, name) is not None]


class StreamOptions(BaseModel):
    stream: bool = False
    partial_images: JsonInt = Field(0, ge=0, le=MAX_PARTIAL_IMAGES)


class GenerationsRequest(ImageOptions, StreamOptions):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON: types as the schema says (forms send text)

    prompt: str | None = Field(None, description="accepted and ignored: the model is unconditional")


class VariationsForm(ImageOptions):
    image: UploadFile
    strength: float = Field(DEFAULT_STRENGTH, gt=0, le=1, description="how far the image is noised: t0 = strength x T")


class EditsForm(ImageOptions, StreamOptions):
    image: UploadFile
    mask: UploadFile | None = Field(None, description="PNG of the image's size; alpha 0 = regenerate. "
                                                      "Without it, the image's own transparent pixels")
    jump_length: JsonInt = Field(DEFAULT_JUMP_LENGTH, ge=1, description=JUMP_LENGTH_DESCRIPTION)
    jump_n_sample: JsonInt = Field(1, ge=1, description=JUMP_N_SAMPLE_DESCRIPTION)


@router.post("/images/generations", responses={**ERRORS, **STREAMING})
async def generations(body: GenerationsRequest, request: Request, state: State, owner: Owner) -> Response:
    """OpenAI's images.generate: n images from noise."""
    return await run(state, request, body, owner, None, "image_generation")


@router.post("/images/variations", responses=ERRORS)
async def variations(form: Annotated[VariationsForm, Form()], request: Request, state: State,
                     owner: Owner) -> Response:
    """OpenAI's images.create_variation: SDEdit, the image noised to strength x T and denoised."""
    shape = model_shape(state)
    source = Source("variation", picture("image", await form.image.read(), shape), strength=form.strength)
    return await run(state, request, form, owner, source, None)


@router.post("/images/edits", responses={**ERRORS, **STREAMING})
async def edits(form: Annotated[EditsForm, Form()], request: Request, state: State, owner: Owner) -> Response:
    """OpenAI's images.edit: inpainting, the transparent area regenerated."""
    shape = model_shape(state)
    image = open_image("image", await form.image.read())
    keep = (keep_mask("mask", await form.mask.read(), image.size, shape) if form.mask is not None
            else own_alpha_keep("image", image, shape))
    source = Source("inpaint", as_picture(image, shape), keep=keep, jump_length=form.jump_length,
                    jump_n_sample=form.jump_n_sample)
    return await run(state, request, form, owner, source, "image_edit")


def model_shape(state: ServerState) -> tuple[int, int, int]:
    if state.limits.image_shape is None:
        raise ApiError(422, "invalid_request", "image: this server's engine takes no input images")
    return state.limits.image_shape


async def run(state: ServerState, request: Request, options: ImageOptions, owner: str | None,
              source: Source | None, stream_prefix: str | None) -> Response:
    check_options(state, options)
    streaming = isinstance(options, StreamOptions) and options.stream
    partial_images = options.partial_images if streaming else 0
    spec = state.accept(GenerationSpec(
        n=options.n, steps=options.steps, sampler=options.sampler, eta=options.eta, seed=options.seed,
        owner=owner, source=source,
        **previews(partial_images, options.steps or default_steps(options.sampler, state.limits.num_timesteps))))
    ignored = options.ignored()
    headers = {"X-DDPM-Ignored": ", ".join(ignored)} if ignored else {}
    if streaming and stream_prefix is not None:
        events = sse_events(state, spec, owner, stream_prefix, partial_images, size_of(state))
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    with state.slots.hold(owner):
        handle = state.engine.submit(spec)
        done = await result_unless_disconnected(handle, request)
    return Response(json.dumps(images_response(done, ignored, size_of(state))), media_type="application/json",
                    headers={**headers, "X-Request-Id": done.id})


def check_options(state: ServerState, options: ImageOptions) -> None:
    if options.response_format == "url":
        raise ApiError(422, "invalid_request", "response_format: url is not supported (this server stores no "
                                               "files); use b64_json")
    if options.size not in (None, "auto", size_of(state)):
        raise ApiError(422, "invalid_request", f"size: this model makes {size_of(state)} images, got {options.size!r}")
    if isinstance(options, StreamOptions) and options.partial_images and not options.stream:
        raise ApiError(422, "invalid_request", "partial_images: only with stream: true")


def size_of(state: ServerState) -> str:
    _, height, width = state.limits.image_shape or (0, 0, 0)
    return f"{width}x{height}"


def previews(partial_images: int, steps: int) -> dict:
    """Frames of the x0 guess spread over the run: about partial_images of them per image."""
    if not partial_images:
        return {}
    return {"preview_every": max(1, math.ceil(steps / (partial_images + 1))), "preview_kinds": ("x0",)}


def images_response(done: Done, ignored: list[str], size: str) -> dict:
    return {
        "created": done.created,
        "data": [image_data(image) for image in done.images],
        "output_format": "png",
        "size": size,
        "id": done.id,
        "seed": done.seed,
        "ignored": ignored,
    }


def image_data(image: GeneratedImage) -> dict:
    """OpenAI's Image, plus this image's own seed; revised_prompt is empty: no prompt was used."""
    return {"b64_json": json_of(image)["b64_json"], "revised_prompt": "", "seed": image.seed, "index": image.index}


def json_of(model: BaseModel) -> dict:
    return model.model_dump(mode="json", by_alias=True)


async def sse_events(state: ServerState, spec: ValidSpec, owner: str | None, prefix: str, partial_images: int,
                     size: str) -> AsyncIterator[str]:
    """OpenAI's stream: `{prefix}.partial_image` per preview, `{prefix}.completed` per image."""
    with state.slots.hold(owner):
        handle = state.engine.submit(spec)
        yield ": accepted\n\n"  # an SSE comment, which clients skip: the stream has begun (on Ray, headers go now)
        sent: dict[int, int] = {}
        try:
            async for event in handle.events():
                if isinstance(event, Frame) and sent.get(event.index, 0) < partial_images:
                    yield sse(f"{prefix}.partial_image", {
                        **stream_fields(json_of(event)["png"], size), "partial_image_index": sent.get(event.index, 0),
                        "index": event.index})
                    sent[event.index] = sent.get(event.index, 0) + 1
                elif isinstance(event, Done):
                    for image in event.images:
                        yield sse(f"{prefix}.completed", {**stream_fields(json_of(image)["b64_json"], size),
                                                          "index": image.index, "seed": image.seed, "usage": USAGE})
                elif isinstance(event, Failed):
                    yield sse("error", {"error": {"code": event.code, "message": event.message}})
        except (EngineError, InvalidSpec) as exc:
            error = api_error_for(exc)
            yield sse("error", {"error": {"code": error.code, "message": error.message}})
        finally:
            handle.cancel()  # a no-op once done; frees the lanes of a client that left


USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}


def stream_fields(b64_png: str, size: str) -> dict:
    return {"b64_json": b64_png, "background": "opaque", "created_at": int(time.time()), "output_format": "png",
            "quality": "auto", "size": size}


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"
