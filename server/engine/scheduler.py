"""The batching policy: which waiting lanes to admit and how many running lanes to step.

A plain object over plain numbers (no torch, no threads, no asyncio), so every policy can be
tested without a model. The engine asks it once per iteration:

    plan = scheduler.schedule(waiting=lanes waiting per request (FIFO), running=lanes running)

and gets back how many lanes of each of the first requests to admit, and how many of the
running lanes (oldest first) to put through this step's single U-Net call.

Policies:
- continuous: admit into any free slot at every step (step-level batching).
- static:     admit only when nothing runs; the batch then runs to its end.
- sequential: like static, but one request at a time.

Lanes are admitted in FIFO order, whole requests first: no lane of a request is admitted
before every lane of the requests ahead of it. A request larger than the free slots is split:
its first lanes start now and the rest as slots free up (waiting for room to take it whole
would leave slots idle without finishing it any sooner).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

from server.contract import POLICIES, Policy

REGROW_AFTER_STEPS = 64  # good steps below max_batch before the cap doubles again (see step_succeeded)


@dataclass(frozen=True)
class SchedulePlan:
    admit: tuple[int, ...]  # lanes to admit from each of the first len(admit) waiting requests
    run: int  # how many running lanes (oldest first, after admission) go through the U-Net

    @property
    def admitted(self) -> int:
        return sum(self.admit)


class Scheduler:
    def __init__(self, policy: Policy, max_batch: int):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.policy = policy
        self.max_batch = max_batch
        self.batch_cap = max_batch
        self._lowerings = 0
        self._regrow_after = REGROW_AFTER_STEPS
        self._good_steps = 0

    def halve_batch_cap(self) -> bool:
        """After running out of device memory: False when the cap is already 1."""
        if self.batch_cap == 1:
            return False
        self.lower_batch_cap(self.batch_cap // 2)
        return True

    def lower_batch_cap(self, cap: int) -> None:
        """At most `cap` lanes per step from now on, until good steps regrow it. Each lowering
        doubles the good steps the next regrowth waits for, so a batch size that keeps failing
        is retried ever more rarely."""
        self._regrow_after = REGROW_AFTER_STEPS << self._lowerings
        self._lowerings += 1
        self.batch_cap = max(1, min(cap, self.batch_cap))
        self._good_steps = 0

    def step_succeeded(self) -> None:
        """Below max_batch, the cap doubles after each run of good steps (up to max_batch): an
        out-of-memory is often passing (another process on the GPU, fragmentation), and a cap
        that never grew back would cost throughput for the life of the server."""
        if self.batch_cap == self.max_batch:
            return
        self._good_steps += 1
        if self._good_steps >= self._regrow_after:
            self.batch_cap = min(self.max_batch, self.batch_cap * 2)
            self._good_steps = 0

    def schedule(self, waiting: Iterable[int], running: int) -> SchedulePlan:
        admit = self._admit(waiting, running)
        return SchedulePlan(admit, min(running + sum(admit), self.batch_cap))

    def _admit(self, waiting: Iterable[int], running: int) -> tuple[int, ...]:
        if self.policy == "continuous":
            return fill_fifo(waiting, self.batch_cap - running)
        if running:  # static and sequential: the current batch runs to its end
            return ()
        if self.policy == "static":
            return fill_fifo(waiting, self.batch_cap)
        return fill_fifo(islice(waiting, 1), self.batch_cap)


def fill_fifo(waiting: Iterable[int], free: int) -> tuple[int, ...]:
    """Take lanes from the head of the queue until `free` slots are used (reads no further)."""
    admit: list[int] = []
    if free <= 0:
        return ()
    for lanes in waiting:
        take = min(lanes, free)
        admit.append(take)
        free -= take
        if not free:
            break
    return tuple(admit)
