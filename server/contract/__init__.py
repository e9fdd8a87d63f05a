"""The contract between the API and any engine: plain data and one Protocol, no torch.

    spec = validate(GenerationSpec(n=2, steps=50, sampler="ddim"), engine.model_info().limits)
    handle = engine.submit(spec)                       # engine: any EngineClient
    async for event in handle.events(): ...            # Queued, Started, Progress, Frame..., Done | Failed

The API imports this package and never `server.engine` (which loads torch); a test keeps it so.
The real engine, the tests' fake engine and (later) remote engines implement `EngineClient`.
"""

from .client import EngineClient, EngineObserver, NullObserver, RequestHandle
from .config import DEFAULT_ENGINE_CONFIG, POLICIES, EngineConfig, Policy
from .errors import EngineClosed, EngineError, GenerationFailed, InvalidSpec, QueueFull
from .events import (
    OUTCOMES,
    Done,
    Event,
    Failed,
    Frame,
    GeneratedImage,
    ModelInfo,
    Progress,
    Queued,
    RequestState,
    RequestStatus,
    Requeued,
    Started,
    event_json,
)
from .spec import (
    FRAME_KINDS,
    MAX_SEED,
    SAMPLER_NAMES,
    FrameKind,
    GenerationSpec,
    RequestLimits,
    SamplerName,
    ValidSpec,
    default_steps,
    validate,
)

__all__ = [
    "DEFAULT_ENGINE_CONFIG",
    "FRAME_KINDS",
    "MAX_SEED",
    "OUTCOMES",
    "POLICIES",
    "SAMPLER_NAMES",
    "Done",
    "EngineClient",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "Event",
    "Failed",
    "Frame",
    "FrameKind",
    "GeneratedImage",
    "GenerationFailed",
    "GenerationSpec",
    "InvalidSpec",
    "ModelInfo",
    "NullObserver",
    "Policy",
    "Progress",
    "Queued",
    "QueueFull",
    "RequestHandle",
    "RequestLimits",
    "RequestState",
    "RequestStatus",
    "Requeued",
    "SamplerName",
    "Started",
    "ValidSpec",
    "default_steps",
    "event_json",
    "validate",
]
