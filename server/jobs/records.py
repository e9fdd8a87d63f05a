"""What a job's record holds, and what any store of records must do."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from server.contract import Done, GeneratedImage, GenerationSpec, ValidSpec
from server.contract.sources import source_from_json, source_to_json

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
UNFINISHED = ("queued", "running")


class StoreError(RuntimeError):
    """The job store cannot be read or written (corrupt, unwritable, full disk, unreachable)."""


@dataclass
class JobRecord:
    id: str
    owner: str | None  # the API key's id (server.settings.key_id), never the key
    spec: dict[str, Any]  # the validated request, its seed resolved: the job's images depend on nothing else
    status: JobStatus = "queued"
    seq: int = 0  # acceptance order, set by the store
    attempts: int = 0  # runs started
    created: float = field(default_factory=time.time)
    finished: float | None = None
    result: str | None = None  # the Done event's JSON (base64 PNGs)
    error: dict[str, str] | None = None  # {"code", "message"}
    worker: str | None = None  # the server that holds the job while it is unfinished...
    lease_until: float | None = None  # ...until then, unless it renews its lease

    @property
    def unfinished(self) -> bool:
        return self.status in UNFINISHED

    @property
    def size(self) -> int:
        return len(self.result or "")

    def request(self) -> GenerationSpec:
        """The request to validate again on a re-run (against the model served then)."""
        source = self.spec.get("source")
        return GenerationSpec(**{**self.spec, "preview_kinds": tuple(self.spec["preview_kinds"]),
                                 "source": source and source_from_json(source)})

    def done(self) -> Done | None:
        return None if self.result is None else done_from_json(self.result)


def spec_fields(spec: ValidSpec) -> dict[str, Any]:
    return {"n": spec.n, "steps": spec.steps, "sampler": spec.sampler, "eta": spec.eta, "seed": spec.seed,
            "preview_every": spec.preview_every, "preview_kinds": list(spec.preview_kinds),
            "timeout_s": spec.timeout_s, "owner": spec.owner,
            "source": spec.source and source_to_json(spec.source)}


def done_from_json(text: str) -> Done:
    data = json.loads(text)
    images = [GeneratedImage(index=image["index"], seed=image["seed"], png=base64.b64decode(image["b64_json"]))
              for image in data["data"]]
    return Done(id=data["id"], created=data["created"], seed=data["seed"], images=images, timings=data["timings"])


class JobRepository(Protocol):
    """Every call commits before it returns, or raises StoreError and changes nothing."""

    durable: bool  # whether records outlive this process

    def add(self, record: JobRecord) -> None:
        """Store a new record, setting its `seq` (acceptance order)."""

    def save(self, record: JobRecord) -> None:
        """Write the record's status, attempts, finish time, result and error."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def delete(self, job_id: str) -> None: ...

    def unfinished(self) -> list[JobRecord]:
        """Queued and running records, in acceptance order."""

    def claim(self, worker: str, now: float, until: float) -> list[JobRecord]:
        """Atomically take, for `worker` until `until`, the unfinished records that no live server
        holds: no worker, `worker` itself (a previous life), or a lease that ended before `now`.
        Returns them in acceptance order."""

    def renew(self, worker: str, until: float) -> None:
        """Extend the leases of `worker`'s unfinished records to `until`."""

    def prune(self, finished_before: float, max_bytes: int) -> int:
        """Delete finished records older than `finished_before`, then the oldest finished ones
        until results take at most `max_bytes`; returns how many were deleted."""

    def counts(self) -> dict[str, int]:
        """Records by status."""

    def close(self) -> None: ...
