"""What can go wrong between the API and an engine."""

from __future__ import annotations

from .events import Failed
from .spec import InvalidSpec


class EngineError(Exception):
    """Base of the errors `submit` raises; nothing was accepted."""


class QueueFull(EngineError):
    def __init__(self, retry_after_s: float):
        super().__init__(f"queue is full; retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class EngineClosed(EngineError):
    """The engine is shutting down or stopped."""


class GenerationFailed(Exception):
    """An accepted request ended without images (RequestHandle.result)."""

    def __init__(self, failure: Failed):
        super().__init__(f"{failure.code}: {failure.message}")
        self.failure = failure


__all__ = ["EngineClosed", "EngineError", "GenerationFailed", "InvalidSpec", "QueueFull"]
