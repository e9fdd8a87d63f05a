"""How an engine is set up: batching policy, limits, previews, shutdown.

The API's settings (server/settings.py) take their defaults from DEFAULT_ENGINE_CONFIG, so each
default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .spec import DEFAULT_MAX_IMAGES_PER_REQUEST

# continuous: admit into any free slot at every step (step-level batching);
# static: admit only when nothing runs; sequential: like static, one request at a time.
Policy = Literal["continuous", "static", "sequential"]
POLICIES: tuple[str, ...] = get_args(Policy)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # lanes (images) per U-Net call
    max_queue: int = 256  # waiting images (not requests) before submit raises QueueFull
    policy: Policy = "continuous"
    default_timeout_s: float = 3600.0  # deadline from submission when a spec gives none
    max_preview_fps: float = 10.0  # frames per second, per request
    shutdown_grace_s: float = 30.0
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    progress_interval_s: float = 0.1  # at most one Progress event per request per interval
    encoder_threads: int = 2  # PNG encoding pool
    torch_threads: int | None = None  # intra-op threads of the engine thread (None: torch's count at construction)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        positive = ("max_batch", "max_queue", "max_images_per_request", "encoder_threads",
                    "default_timeout_s", "max_preview_fps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("shutdown_grace_s", "progress_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_queue < self.max_images_per_request:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_images_per_request "
                             f"({self.max_images_per_request}), or the largest requests never fit")


DEFAULT_ENGINE_CONFIG = EngineConfig()
