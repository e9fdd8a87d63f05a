"""What goes over the wire: request bodies (strict types, no extra fields) and response shapes.

Bodies are parsed for types only; every range is checked once, by server.contract.validate
(the bounds shown in the OpenAPI schema are the contract's own constants). The responses
are the contract's events: POST /generate answers with the `done` event itself.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from server.contract import MAX_SEED, Done, FrameKind, GenerationSpec, SamplerName
from server.contract.spec import ETA_RANGE


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


class GenerateRequest(BaseModel):
    """One batch of images from one sampler. Used by POST /generate and POST /jobs."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=ETA_ONLY_WITH_DDIM)

    n: JsonInt = Field(GenerationSpec.n, json_schema_extra=bounds(1),
                   description="images (at most the model's max_images_per_request)")
    steps: JsonInt | None = Field(GenerationSpec.steps, json_schema_extra=bounds(1),
                              description="denoising steps, 1..T; default T (the paper's 1000)")
    sampler: SamplerName = Field(GenerationSpec.sampler, description="ddpm (ancestral, the paper's) or ddim")
    eta: float = Field(GenerationSpec.eta, json_schema_extra=bounds(*ETA_RANGE),
                       description="DDIM noise: 0 deterministic, 1 DDPM-like")
    seed: JsonInt | None = Field(GenerationSpec.seed, json_schema_extra=bounds(0, MAX_SEED),
                             description="request seed; random when absent")
    response_format: Literal["b64_json"] = "b64_json"

    def to_spec(self, owner: str | None, default_preview_every: int = 0) -> GenerationSpec:
        return GenerationSpec(n=self.n, steps=self.steps, sampler=self.sampler, eta=self.eta, seed=self.seed,
                              owner=owner, **self.previews(default_preview_every))

    def previews(self, default_preview_every: int) -> dict:
        return {}  # REST answers with the final images only


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
