"""What goes over the wire: request bodies (strict, no extra fields) and response shapes.

Static bounds live on the fields; bounds that depend on the served model (n, steps) are checked
by `ModelLimits.check`, so one message format covers both.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.engine.types import Done, FrameKind, GenerationSpec, SamplerName

MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    """One batch of images from one sampler. Used by POST /generate and POST /jobs."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    n: int = Field(1, ge=1, description="images to generate (at most the model's max_images_per_request)")
    steps: int | None = Field(None, ge=1, description="denoising steps, 1..T; default T (the paper's 1000)")
    sampler: SamplerName = Field("ddpm", description="ddpm (ancestral, the paper's) or ddim")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM noise: 0 deterministic, 1 DDPM-like")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="request seed; random when absent")
    response_format: Literal["b64_json"] = "b64_json"


class StreamRequest(GenerateRequest):
    """The one message a WebSocket client sends to start: GenerateRequest plus previews."""

    type: Literal["generate"] = "generate"
    preview_every: int | None = Field(
        None, ge=0, description="send frames every k steps (0: none; absent: the server's default)"
    )
    preview_kinds: list[FrameKind] = Field(["x_t", "x0"], min_length=1, max_length=2)


@dataclass(frozen=True)
class ModelLimits:
    num_timesteps: int
    max_images_per_request: int

    def check(self, request: GenerateRequest) -> None:
        """Raise OutOfRange naming the field and its allowed range."""
        if request.n > self.max_images_per_request:
            raise OutOfRange("n", f"n must be between 1 and {self.max_images_per_request}, got {request.n}")
        if request.steps is not None and request.steps > self.num_timesteps:
            raise OutOfRange(
                "steps", f"steps must be between 1 and {self.num_timesteps} (the model's T), got {request.steps}"
            )

    def to_spec(self, request: GenerateRequest, owner: str | None, default_preview_every: int = 0) -> GenerationSpec:
        self.check(request)
        preview_every, preview_kinds = 0, ("x_t", "x0")
        if isinstance(request, StreamRequest):
            preview_every = default_preview_every if request.preview_every is None else request.preview_every
            preview_kinds = tuple(dict.fromkeys(request.preview_kinds))
        return GenerationSpec(
            n=request.n,
            steps=request.steps,
            sampler=request.sampler,
            eta=request.eta,
            seed=request.seed,
            preview_every=preview_every,
            preview_kinds=preview_kinds,
            owner=owner,
        )


class OutOfRange(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ImageData(BaseModel):
    index: int
    seed: int = Field(description="this image's own seed: the same seed and index give the same image")
    b64_json: str = Field(description="PNG, base64")


class GenerateResponse(BaseModel):
    id: str
    created: int = Field(description="unix time")
    seed: int = Field(description="the request seed")
    data: list[ImageData]
    timings: dict[str, float] = Field(description="queue_s, run_s, total_s")

    @classmethod
    def from_done(cls, done: Done) -> "GenerateResponse":
        return cls(
            id=done.request_id,
            created=int(time.time()),
            seed=done.seed,
            data=[ImageData(index=i.index, seed=i.seed, b64_json=b64(i.png)) for i in done.images],
            timings=done.timings,
        )


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobCreated(BaseModel):
    id: str
    status: JobState
    queue_position: int | None


class JobView(BaseModel):
    id: str
    status: JobState
    created: int
    queue_position: int | None = Field(description="0 = next; null once running")
    step: int
    total: int
    eta_s: float | None
    result: GenerateResponse | None = None
    error: ErrorBody | None = None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
