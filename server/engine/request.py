"""A request and its lanes: the engine thread's bookkeeping for one generation.

A request of n images becomes n lanes. Each lane carries its own x_t, its own position in
its sampler's step list, its own noise stream (a CPU generator) and, for a multistep sampler,
its own history, so a lane computes the same image in any batch, beside any other lanes, at any
step of theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.samplers import NoiseStream, SamplingPlan, Slot, image_seed, stack_to

from server.contract import RequestState, ValidSpec
from server.contract.channel import EventChannel


log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # hashed by identity: a step gathers the set of its lanes' plans
class LanePlan:
    """A SamplingPlan as Python lists: gathering B rows from lists is one cheap
    torch.tensor call per step, where indexing B tensors would be B small ops."""

    timesteps: list[int]
    coef_rows: list[list[float]]
    draws: int  # normal draws per image (SamplingPlan.draws)
    noisy: bool
    carries: frozenset[Slot]
    corrects: bool

    @classmethod
    def of(cls, plan: SamplingPlan) -> "LanePlan":
        return cls(plan.timesteps.tolist(), plan.coefs.tolist(), plan.draws, plan.noisy, plan.carries, plan.corrects)

    def __len__(self) -> int:
        return len(self.timesteps)


class Lane:
    """One image of a request on its way from x_T to x_0."""

    __slots__ = ("request", "index", "plan", "cursor", "x", "noise", "carried", "next_carried")

    def __init__(self, request: "Request", index: int, noise: NoiseStream, x_T: torch.Tensor):
        self.request = request
        self.index = index
        self.plan = request.plan
        self.cursor = 0  # steps done
        self.noise = noise  # x_T was its first draw, step i's z is draw i + 1, exactly as DDPM.sample
        self.x = x_T
        self.carried: dict[Slot, torch.Tensor] = {}  # a multistep sampler's history
        self.next_carried = self.carried  # set by the runner's step, made current by advance

    @property
    def t(self) -> int:
        return self.plan.timesteps[self.cursor]

    @property
    def coefs(self) -> list[float]:
        return self.plan.coef_rows[self.cursor]

    @property
    def finished(self) -> bool:
        return self.cursor == len(self.plan)

    def step_noise(self) -> torch.Tensor | None:
        """z for the current step on the CPU (None if the sampler adds none), the same tensor
        however often it is asked for: a retried step (after an OOM) reuses it."""
        return self.noise[self.cursor + 1] if self.plan.noisy else None

    def advance(self, x_next: torch.Tensor) -> None:
        """Commits the step the runner computed: the sample, the history, the position."""
        self.x = x_next
        self.carried = self.next_carried
        self.cursor += 1


class Request:
    """Everything the engine knows about one accepted request. Owned by the engine thread,
    except the fields `status` reads under the engine's lock and the cancel flag."""

    def __init__(self, request_id: str, spec: ValidSpec, plan: LanePlan, timeout_s: float, channel: EventChannel,
                 on_start: Callable[[], None] | None = None):
        self.id = request_id
        self.on_start = on_start
        self.spec = spec
        self.seed = spec.seed
        self.plan = plan
        self.channel = channel
        self.submitted_at = time.monotonic()
        self.deadline = self.submitted_at + timeout_s
        self.started_at: float | None = None
        self.state = RequestState.QUEUED
        self.cancel_requested = False
        self.lanes_waiting = spec.n  # not yet admitted
        self.lanes: list[Lane] = []  # admitted, running or finished
        self.finals: dict[int, torch.Tensor] = {}
        self.last_frame_at = float("-inf")
        self.last_progress_at = float("-inf")
        self.frames_sent = 0

    @property
    def total(self) -> int:
        return len(self.plan)

    @property
    def step(self) -> int:
        """Steps done by the slowest image (0 while some image waits for a slot)."""
        if self.lanes_waiting or not self.lanes:
            return 0
        return min(lane.cursor for lane in self.lanes)

    @property
    def done(self) -> bool:
        return len(self.finals) == self.spec.n

    def admit_lanes(self, count: int, shape: tuple[int, ...], device: torch.device) -> list[Lane]:
        first = len(self.lanes)
        streams = [NoiseStream(self.seed, index, shape, self.plan.draws) for index in range(first, first + count)]
        x_T = stack_to([stream[0] for stream in streams], device).unbind(0)  # one copy for all
        lanes = [Lane(self, first + i, stream, x) for i, (stream, x) in enumerate(zip(streams, x_T))]
        self.lanes.extend(lanes)
        self.lanes_waiting -= count
        return lanes

    def announce_start(self) -> None:
        """The caller's on_start hook (see EngineClient.submit); a failing hook fails nothing."""
        if self.on_start is not None:
            try:
                self.on_start()
            except Exception:
                log.exception("the start hook of request %s failed", self.id)

    def image_seed(self, index: int) -> int:
        return image_seed(self.seed, index)
