"""The engine's contract with its callers: what a request is, what comes back, what can fail.

Plain data only (no torch, no HTTP), so the API layer can depend on this module alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Union

SamplerName = Literal["ddpm", "ddim"]
FrameKind = Literal["x_t", "x0"]


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request: n images with one sampler. steps=None means the model's T."""

    n: int = 1
    steps: int | None = None
    sampler: SamplerName = "ddpm"
    eta: float = 0.0
    seed: int | None = None  # None: the engine picks one and reports it
    preview_every: int = 0  # publish frames every k steps (0: none)
    preview_kinds: tuple[FrameKind, ...] = ("x_t", "x0")
    timeout_s: float | None = None  # deadline from submission; None: the engine's default
    owner: str | None = None  # who submitted it (an API key id); used for visibility and per-owner limits


class RequestState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Queued:
    request_id: str
    position: int  # 0 = next to be admitted


@dataclass(frozen=True)
class Started:
    request_id: str


@dataclass(frozen=True)
class Progress:
    request_id: str
    step: int  # steps done by the slowest image of the request
    total: int
    eta_s: float | None


@dataclass(frozen=True)
class Frame:
    request_id: str
    step: int
    total: int
    index: int  # image index within the request
    kind: FrameKind
    png: bytes


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int  # the seed of this image alone: image_seed(request seed, index)
    png: bytes


@dataclass(frozen=True)
class Done:
    request_id: str
    seed: int  # the request seed
    images: list[GeneratedImage]
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, run_s, total_s


@dataclass(frozen=True)
class Failed:
    request_id: str
    code: str  # "cancelled", "timeout", "internal", "shutdown", "out_of_memory"
    message: str


Event = Union[Queued, Started, Progress, Frame, Done, Failed]


@dataclass(frozen=True)
class RequestStatus:
    request_id: str
    state: RequestState
    queue_position: int | None
    step: int
    total: int
    eta_s: float | None
    owner: str | None


class EngineError(Exception):
    """Base of the errors `submit` raises; nothing was accepted."""


class QueueFull(EngineError):
    def __init__(self, retry_after_s: float):
        super().__init__(f"queue is full; retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class EngineClosed(EngineError):
    """The engine is shutting down or stopped."""


class InvalidSpec(EngineError, ValueError):
    """A spec the served model cannot run (steps over T, unknown sampler, ...)."""


class GenerationFailed(Exception):
    def __init__(self, failure: Failed):
        super().__init__(f"{failure.code}: {failure.message}")
        self.failure = failure
