"""Durable jobs: accepted work that survives the server (SQLite by default, Redis shared, memory).

A job's images are a pure function of (model, spec, seed), and the seed is resolved when the
job is accepted, so a job interrupted anywhere is run again from its record and gives the
same images. `JobService` runs jobs through any EngineClient and keeps their records in a
`JobRepository`; `open_repository(url)` picks the backend.
"""

from .records import JobRecord, JobRepository, StoreError
from .repositories import open_repository
from .service import JobNotFound, JobService, TooManyJobs

__all__ = ["JobNotFound", "JobRecord", "JobRepository", "JobService", "StoreError", "TooManyJobs", "open_repository"]
