"""Per-key limits: how many requests one API key may have open at once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from server.api.errors import ApiError


class OwnerSlots:
    """At most `limit` open requests per API key (generations, streams and unfinished jobs)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Counter[str] = Counter()

    def acquire(self, owner: str | None) -> None:
        if owner is None:  # no API keys configured: the engine's queue is the only limit
            return
        if self.open[owner] >= self.limit:
            raise ApiError(429, "too_many_requests", f"at most {self.limit} open requests per API key",
                           {"Retry-After": "1"})
        self.open[owner] += 1

    def take(self, owners: Iterable[str | None]) -> None:
        """Hold slots past the limit: for jobs accepted before a restart, which must run."""
        self.open.update(owner for owner in owners if owner is not None)

    def release(self, owner: str | None) -> None:
        if owner is not None:
            self.open[owner] -= 1
            if self.open[owner] <= 0:
                del self.open[owner]

    @contextmanager
    def hold(self, owner: str | None) -> Iterator[None]:
        self.acquire(owner)
        try:
            yield
        finally:
            self.release(owner)
