"""Every knob of the server, read once: defaults < DDPM_* environment variables < ddpm-serve flags."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.contract import DEFAULT_ENGINE_CONFIG as ENGINE
from server.contract import EngineConfig, Policy

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS = PROJECT_ROOT / "weights" / "ddpm-mnist.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="forbid", frozen=True)

    # The model
    weights: Path = Field(SHIPPED_WEIGHTS, description="our .safetensors file or a diffusers folder")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the U-Net's compute dtype (sampling stays float32); auto: bfloat16 where the device "
                            "computes it natively (CUDA from Ampere, CPUs with AVX512-BF16 or AMX), else float32")

    # Listening
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # The engine
    max_batch: int = Field(ENGINE.max_batch, ge=1, description="images per U-Net call")
    max_queue: int = Field(ENGINE.max_queue, ge=1, description="images waiting before new requests get 429")
    policy: Policy = ENGINE.policy
    max_images_per_request: int = Field(ENGINE.max_images_per_request, ge=1)
    request_timeout_s: float = Field(ENGINE.default_timeout_s, gt=0)
    shutdown_grace_s: float = Field(ENGINE.shutdown_grace_s, ge=0)
    max_preview_fps: float = Field(ENGINE.max_preview_fps, gt=0)
    torch_threads: int = Field(0, ge=0, description="torch threads of the engine (0: torch's default, all cores)")

    # The API
    default_preview_every: int = Field(0, ge=0, description="WebSocket preview cadence when a request gives none")
    max_body_bytes: int = Field(16 * 1024, ge=256)

    # Connections
    max_connections: int = Field(512, ge=1, description="open connections (WebSockets included); beyond: 503")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="a request's line and headers; beyond: 431")
    read_timeout_s: float = Field(10.0, gt=0, description="time for a request (headers and body) to arrive; then 408")
    ws_send_timeout_s: float = Field(
        10.0, gt=0, description="a WebSocket client that reads nothing for this long is cancelled and dropped")
    job_ttl_s: float = Field(3600.0, gt=0, description="how long finished jobs stay readable")
    max_jobs: int = Field(1024, ge=1, description="unfinished jobs at once; beyond: 429")

    # Durable jobs
    state_dir: Path = Field(Path("state"), description="where the default job store lives")
    jobs_db: str | None = Field(None, description="sqlite:///path.db (default: <state-dir>/jobs.db), "
                                                   "redis://host:port/db (shared by replicas) or memory://")
    jobs_max_bytes: int = Field(1 << 30, ge=1 << 20, description="stored results at most; oldest finished go first")
    job_max_attempts: int = Field(3, ge=1, description="runs a job may start before an interrupted one ends failed")
    job_lease_s: float = Field(30.0, gt=0, description="a server's hold on its unfinished jobs, renewed while it "
                                                       "lives; other servers on the store take them over after it")
    worker_id: str | None = Field(None, description="this server's name in the job store (default: host:port); "
                                                    "a restart under the same name takes its jobs back at once")

    # Security
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated")
    max_concurrent_per_key: int = Field(8, ge=1, description="open requests per API key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("weights", mode="after")
    @classmethod
    def resolve_from_project_root(cls, path: Path) -> Path:
        # A relative path means the same file whatever directory the server is started from,
        # unless it exists relative to the current directory.
        path = path.expanduser()
        return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path

    @model_validator(mode="after")
    def engine_accepts_the_settings(self) -> "Settings":
        self.engine_config()  # EngineConfig checks how its fields fit together (a ValueError: exit 2)
        return self

    def engine_config(self, torch_threads: int | None = None) -> EngineConfig:
        return EngineConfig(
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            policy=self.policy,
            default_timeout_s=self.request_timeout_s,
            max_preview_fps=self.max_preview_fps,
            shutdown_grace_s=self.shutdown_grace_s,
            max_images_per_request=self.max_images_per_request,
            torch_threads=torch_threads,
        )

    @property
    def worker_name(self) -> str:
        return self.worker_id or f"{socket.gethostname()}:{self.port}"

    @property
    def jobs_url(self) -> str:
        return self.jobs_db or f"sqlite:///{self.state_dir / 'jobs.db'}"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


def key_id(api_key: str) -> str:
    """A stable, non-secret name for a key: jobs, limits and logs carry this, never the key."""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:12]
