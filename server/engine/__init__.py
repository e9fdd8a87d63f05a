"""The serving engine: step-level (continuous) batching of DDPM sampling on one device.

    engine = Engine(model.load(path), EngineConfig(max_batch=32))
    await engine.start()
    handle = engine.submit(GenerationSpec(n=4, steps=50, sampler="ddim", seed=1))
    async for event in handle.events(): ...      # Queued, Started, Progress, Frame..., Done | Failed
    await engine.shutdown()

Knows nothing of HTTP; the API layer sees only this module and types.py.
"""

from .config import EngineConfig
from .engine import Engine
from .events import RequestHandle
from .observer import OUTCOMES, EngineObserver, NullObserver
from .scheduler import POLICIES, Policy
from .types import (
    Done,
    EngineClosed,
    EngineError,
    Event,
    Failed,
    Frame,
    FrameKind,
    GeneratedImage,
    GenerationFailed,
    GenerationSpec,
    InvalidSpec,
    Progress,
    Queued,
    QueueFull,
    RequestState,
    RequestStatus,
    SamplerName,
    Started,
)

__all__ = [
    "OUTCOMES",
    "POLICIES",
    "Done",
    "Engine",
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
    "NullObserver",
    "Policy",
    "Progress",
    "Queued",
    "QueueFull",
    "RequestHandle",
    "RequestState",
    "RequestStatus",
    "SamplerName",
    "Started",
]
