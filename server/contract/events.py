"""What comes back from an engine: the events of one request, its status, the served model.

Events are pydantic models with one JSON shape each, used by the WebSocket (`event_json`) and
by HTTP bodies alike: the `done` event is also POST /generate's response. Image bytes are
PNGs in Python and base64 in JSON.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, SerializerFunctionWrapHandler, model_serializer

from .spec import FrameKind, RequestLimits

OUTCOMES = ("succeeded", "failed", "cancelled", "timeout", "shutdown")  # how a request ends (metrics)

PngBytes = Annotated[
    bytes, PlainSerializer(lambda png: base64.b64encode(png).decode("ascii"), return_type=str, when_used="json")
]


class EventModel(BaseModel):
    model_config = ConfigDict(frozen=True)


class NamesReplica(EventModel):
    """An event that may name the replica running the request (`replica`): set by the Ray
    backend (server/ray), absent from the JSON otherwise."""

    @model_serializer(mode="wrap")
    def _without_unknown_replica(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if getattr(self, "replica", None) is None:
            data.pop("replica", None)
        return data


REPLICA_DESCRIPTION = "the Ray Serve replica that took the request (Ray backend only; absent otherwise)"


class Queued(NamesReplica):
    type: Literal["queued"] = "queued"
    id: str
    position: int = Field(description="0 = next to be admitted")
    replica: str | None = Field(default=None, description=REPLICA_DESCRIPTION)


class Started(NamesReplica):
    type: Literal["started"] = "started"
    id: str
    replica: str | None = Field(default=None, description=REPLICA_DESCRIPTION)


class Progress(EventModel):
    type: Literal["progress"] = "progress"
    id: str
    step: int = Field(description="steps done by the slowest image of the request")
    total: int
    eta_s: float | None


class Frame(EventModel):
    type: Literal["frame"] = "frame"
    id: str
    step: int
    total: int
    index: int = Field(description="image index within the request")
    kind: FrameKind
    png: PngBytes = Field(description="PNG, base64")


class GeneratedImage(EventModel):
    index: int
    seed: int = Field(description="this image's own seed: the same seed and index give the same image")
    png: PngBytes = Field(serialization_alias="b64_json", description="PNG, base64")


class Done(EventModel):
    type: Literal["done"] = "done"
    id: str
    created: int = Field(default_factory=lambda: int(time.time()), description="unix time")
    seed: int = Field(description="the request seed")
    images: list[GeneratedImage] = Field(serialization_alias="data")
    timings: dict[str, float] = Field(default_factory=dict, description="queue_s, run_s, total_s")


class Requeued(EventModel):
    """The replica running the request died; it runs again elsewhere from its seed (same images)."""

    type: Literal["requeued"] = "requeued"
    id: str
    attempt: int = Field(description="the run about to start: 2 for the first re-run")
    reason: str


class Failed(EventModel):
    """The request ended without images. Beyond the obvious codes: device_error, the device failed
    for good (the server must be restarted); replica_lost, the Ray replicas running it kept dying;
    interrupted and invalid_request, a durable job the server's stops interrupted too often, or
    one the model served now refuses. With id null (a WebSocket request never accepted), the code
    is the API error's, as an HTTP body would carry it."""

    type: Literal["error"] = "error"
    id: str | None = Field(description="null when the request was never accepted")
    code: str = Field(description="accepted requests: cancelled, timeout, shutdown, out_of_memory, device_error, "
                                  "internal, replica_lost, interrupted, invalid_request; never accepted (id null): "
                                  "invalid_request, queue_full, too_many_requests, shutdown, unavailable")
    message: str


Event = Union[Queued, Started, Progress, Frame, Requeued, Done, Failed]


def event_json(event: Event) -> dict[str, Any]:
    """The event as JSON-ready data, exactly as HTTP responses serialise it."""
    return event.model_dump(mode="json", by_alias=True)


class RequestState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class RequestStatus:
    request_id: str
    state: RequestState
    queue_position: int | None
    step: int
    total: int
    eta_s: float | None
    owner: str | None


class ModelInfo(BaseModel):
    """The served model and the engine around it (GET /models)."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    config: dict[str, Any]
    num_parameters: int
    image_shape: tuple[int, int, int]
    num_timesteps: int
    dataset: str | None
    info: dict[str, Any]
    device: str
    dtype: str = Field(description="the U-Net's compute dtype: float32, bfloat16 or float16 (sampling stays float32)")
    threads: int = Field(description="torch threads of the engine's thread (CPU)")
    samplers: list[str]
    policy: str
    limits: RequestLimits
    max_batch: int
    max_queue: int
    max_preview_fps: float
    default_timeout_s: float
