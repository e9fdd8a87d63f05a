"""What goes over the wire: request bodies (strict types, no extra fields) and response shapes.

Bodies are parsed for types only; every range is checked once, by server.contract.validate
(the bounds shown in the OpenAPI schema are the contract's own constants). The responses
are the contract's events: POST /generate answers with the `done` event itself.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from server.contract import MAX_SEED, Done, FrameKind, GenerationSpec, SamplerName
from server.api.errors import ApiError
from server.api.images import as_picture, keep_mask, open_image, picture
from server.contract.sources import (
    DEFAULT_INTERPOLATION_T,
    DEFAULT_JUMP_LENGTH,
    DEFAULT_STRENGTH,
    MAX_RESAMPLING,
    OPERATIONS,
    Source,
)
from server.contract.spec import ETA_RANGE, SOLVER_DEFAULT_STEPS


def whole_number(value: object) -> object:
    """JSON Schema's integer includes 18.0; strict pydantic alone would refuse it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(whole_number)]


def bounds(minimum: float, maximum: float | None = None) -> dict:
    """Documents a range in the schema; validate() is what enforces it."""
    return {"minimum": minimum} if maximum is None else {"minimum": minimum, "maximum": maximum}


# validate()'s cross-field rule, stated in the schema: a sampler other than ddim (ddpm is the
# default) takes eta = 0.
ETA_ONLY_WITH_DDIM = {
    "if": {"properties": {"sampler": {"not": {"const": "ddim"}}}},
    "then": {"properties": {"eta": {"const": 0}}},
}


JUMP_LENGTH_DESCRIPTION = "inpaint: RePaint's jump length j in steps, 1..T (with jump_n_sample > 1)"
JUMP_N_SAMPLE_DESCRIPTION = (
    "inpaint: RePaint's resampling r, each stretch of jump_length steps denoised r times (1: none; ddpm and ddim "
    f"only). It multiplies the U-Net calls, at most {MAX_RESAMPLING} x T per image"
)


class GenerateRequest(BaseModel):
    """One batch of images from one sampler. Used by POST /generate and POST /jobs."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=ETA_ONLY_WITH_DDIM)

    n: JsonInt = Field(GenerationSpec.n, json_schema_extra=bounds(1),
                   description="images (at most the model's max_images_per_request)")
    steps: JsonInt | None = Field(GenerationSpec.steps, json_schema_extra=bounds(1),
                              description="denoising steps, 1..T; default T (the paper's 1000) for ddpm and ddim, "
                                          + ", ".join(f"{steps} for {name}" for name, steps in SOLVER_DEFAULT_STEPS.items()))
    sampler: SamplerName = Field(GenerationSpec.sampler, description="ddpm (ancestral, the paper's), ddim, dpmpp_2m "
                                 "(DPM-Solver++(2M): near-full quality in 10-20 steps), dpmpp_2m_sde or unipc")
    eta: float = Field(GenerationSpec.eta, json_schema_extra=bounds(*ETA_RANGE),
                       description="DDIM noise: 0 deterministic, 1 DDPM-like")
    seed: JsonInt | None = Field(GenerationSpec.seed, json_schema_extra=bounds(0, MAX_SEED),
                             description="request seed; random when absent")
    response_format: Literal["b64_json"] = "b64_json"
    # Image-to-image (server.contract.sources): images as base64 PNG, JPEG or WebP files.
    operation: Literal["generate", *OPERATIONS] = Field(
        "generate", description="generate from noise, or start from `image` (see the README's image-to-image)")
    image: str | None = Field(None, description="base64 image file: variation, inpaint, interpolate, reconstruct")
    mask: str | None = Field(None, description="inpaint: base64 PNG of the image's size; alpha 0 = regenerate")
    image2: str | None = Field(None, description="interpolate: the second image (base64)")
    strength: float = Field(DEFAULT_STRENGTH, gt=0, le=1,
                            description="variation: how far to noise the image, t0 = strength x T (0 < strength <= 1)")
    lambdas: list[float] | None = Field(None, description="interpolate: one image per lambda in [0, 1]")
    t: JsonInt = Field(DEFAULT_INTERPOLATION_T, ge=1,
                       description="interpolate: the paper's t to encode both images at (1..T)")
    timesteps: list[JsonInt] | None = Field(None, description="reconstruct: one image per t in 1..T")
    jump_length: JsonInt = Field(DEFAULT_JUMP_LENGTH, ge=1, description=JUMP_LENGTH_DESCRIPTION)
    jump_n_sample: JsonInt = Field(1, ge=1, description=JUMP_N_SAMPLE_DESCRIPTION)

    def to_spec(self, owner: str | None, default_preview_every: int = 0,
                image_shape: tuple[int, int, int] | None = None) -> GenerationSpec:
        return GenerationSpec(n=self.n, steps=self.steps, sampler=self.sampler, eta=self.eta, seed=self.seed,
                              owner=owner, source=self.source(image_shape), **self.previews(default_preview_every))

    def source(self, image_shape: tuple[int, int, int] | None) -> Source | None:
        if self.operation == "generate":
            for name in ("image", "mask", "image2", "lambdas", "timesteps"):
                if getattr(self, name) is not None:
                    raise ApiError(422, "invalid_request", f"{name}: only for image-to-image operations; "
                                                           "set operation")
            return None
        if image_shape is None:
            raise ApiError(422, "invalid_request", "operation: this server's engine takes no input images")
        image = open_image("image", required(self, "image"))
        return Source(
            operation=self.operation,
            image=as_picture(image, image_shape),
            strength=self.strength,
            keep=keep_mask("mask", required(self, "mask"), image.size, image_shape)
            if self.operation == "inpaint" else None,
            other=picture("image2", required(self, "image2"), image_shape) if self.operation == "interpolate" else None,
            lambdas=tuple(required_list(self, "lambdas", "interpolate")),
            t=self.t,
            timesteps=tuple(required_list(self, "timesteps", "reconstruct")),
            jump_length=self.jump_length,
            jump_n_sample=self.jump_n_sample,
        )

    def previews(self, default_preview_every: int) -> dict:
        return {}  # REST answers with the final images only


def required(body: BaseModel, name: str) -> bytes:
    """The base64 field `name` decoded, or a 422 naming it."""
    text = getattr(body, name)
    if text is None:
        raise ApiError(422, "invalid_request", f"{name}: required for operation {body.operation}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or characters outside ASCII
        raise ApiError(422, "invalid_request", f"{name}: not valid base64 ({exc})") from exc


def required_list(body: BaseModel, name: str, operation: str) -> list:
    values = getattr(body, name)
    if body.operation != operation:
        if values is not None:
            raise ApiError(422, "invalid_request", f"{name}: only for operation {operation}")
        return []
    if values is None:
        raise ApiError(422, "invalid_request", f"{name}: required for operation {operation}")
    return values


class JobRequest(GenerateRequest):
    """POST /jobs: GenerateRequest plus previews, for clients that attach to WS /ws/jobs/{id}."""

    preview_every: JsonInt | None = Field(
        None, json_schema_extra=bounds(0), description="frames every k steps (0: none; absent: the server's default)"
    )
    preview_kinds: list[FrameKind] = Field(list(GenerationSpec.preview_kinds), json_schema_extra={"minItems": 1})

    def previews(self, default_preview_every: int) -> dict:
        every = default_preview_every if self.preview_every is None else self.preview_every
        return {"preview_every": every, "preview_kinds": tuple(self.preview_kinds)}


class StreamRequest(JobRequest):
    """The one message a WebSocket client sends to start: GenerateRequest plus previews."""

    type: Literal["generate"] = "generate"


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobCreated(BaseModel):
    id: str
    status: JobState
    queue_position: int | None
    seed: int = Field(description="the request seed, drawn at acceptance if absent: a re-run gives the same images")


class JobView(BaseModel):
    id: str
    status: JobState
    created: int
    queue_position: int | None = Field(description="0 = next; null once running")
    step: int
    total: int
    eta_s: float | None
    attempts: int = Field(description="runs started (a restart interrupts a run; each job gets --job-max-attempts)")
    result: Done | None = None
    error: ErrorBody | None = None
