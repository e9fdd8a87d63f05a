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
from dataclasses import dataclass, replace

import torch

from model.diffusion import GaussianDiffusion
from model.samplers import REACHES_X0, NoiseStream, SamplingPlan, Slot, image_seed, renoise_coefs, stack_to

from server.contract import RequestState, ValidSpec
from server.contract.channel import EventChannel

from .sources import KnownRegion, LaneStart, encode


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Jump:
    """RePaint's resampling after a step: x = kept * x + fresh * z, z the lane's `ordinal`-th jump draw."""

    ordinal: int
    kept: float
    fresh: float


@dataclass(frozen=True, eq=False)  # hashed by identity: a step gathers the set of its lanes' plans
class LanePlan:
    """A SamplingPlan as Python lists: gathering B rows from lists is one cheap
    torch.tensor call per step, where indexing B tensors would be B small ops."""

    timesteps: list[int]
    coef_rows: list[list[float]]
    reaches: list[int]  # where each step lands (REACHES_X0: x_0)
    draws: int  # normal draws per image (SamplingPlan.draws)
    noisy: bool
    carries: frozenset[Slot]
    corrects: bool
    jumps: dict[int, Jump]  # by the step after which the sample is noised back up (RePaint)

    @classmethod
    def of(cls, plan: SamplingPlan, alphas_cumprod: torch.Tensor) -> "LanePlan":
        timesteps, reaches = plan.timesteps.tolist(), plan.reaches.tolist()
        rises = [k for k in range(len(plan) - 1) if timesteps[k + 1] != reaches[k]]
        jumps = {k: Jump(ordinal, *renoise_coefs(alphas_cumprod, reaches[k], timesteps[k + 1]))
                 for ordinal, k in enumerate(rises)}
        return cls(timesteps, plan.coefs.tolist(), reaches, plan.draws, plan.noisy, plan.carries, plan.corrects, jumps)

    def restarted(self, tail: "LanePlan", start: int) -> "LanePlan":
        """This plan with the steps from `start` on taken from `tail`, the plan of a chain that
        begins there (make_plan's start), so lanes index every plan of a request alike."""
        return replace(self, coef_rows=self.coef_rows[:start] + tail.coef_rows,
                       reaches=self.reaches[:start] + tail.reaches, carries=self.carries | tail.carries)

    def __len__(self) -> int:
        return len(self.timesteps)


class Lane:
    """One image of a request on its way from x_T to x_0."""

    __slots__ = ("request", "index", "plan", "start", "cursor", "x", "noise", "carried", "next_carried", "known")

    def __init__(self, request: "Request", index: int, plan: LanePlan, noise: NoiseStream, x_start: torch.Tensor,
                 start: int = 0, known: KnownRegion | None = None):
        self.request = request
        self.index = index
        self.plan = plan
        self.start = start  # the plan step it starts at: 0, or later for a lane from an image
        self.cursor = start  # steps done
        # x_T (or an image's encoding noise) was its first draw, the z of its k-th step draw k,
        # exactly as DDPM.sample
        self.noise = noise
        self.x = x_start
        self.known = known  # inpainting: the pixels to keep
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
        return self.noise[self.steps_run + 1] if self.plan.noisy else None

    @property
    def steps_run(self) -> int:
        return self.cursor - self.start

    @property
    def next_t(self) -> int | None:
        """The timestep this step reaches (None: x_0)."""
        reached = self.plan.reaches[self.cursor]
        return None if reached == REACHES_X0 else reached

    @property
    def jump(self) -> Jump | None:
        """RePaint's noising back up after this step, if the plan jumps here."""
        return self.plan.jumps.get(self.cursor)

    def advance(self, x_next: torch.Tensor) -> None:
        """Commits the step the runner computed: the sample, the history, the position."""
        self.x = x_next
        self.carried = self.next_carried
        self.cursor += 1


class Request:
    """Everything the engine knows about one accepted request. Owned by the engine thread,
    except the fields `status` reads under the engine's lock and the cancel flag."""

    def __init__(self, request_id: str, spec: ValidSpec, plan: LanePlan, timeout_s: float, channel: EventChannel,
                 on_start: Callable[[], None] | None = None, starts: list[LaneStart] | None = None,
                 lane_plans: list[LanePlan] | None = None):
        """plan: the request's; lane_plans: each image's, where it differs (a multistep lane
        that starts from an image later than step 0)."""
        self.id = request_id
        self.on_start = on_start
        self.spec = spec
        self.seed = spec.seed
        self.plan = plan
        self.starts = starts or [LaneStart()] * spec.n
        self.lane_plans = lane_plans or [plan] * spec.n
        self.one_noise = spec.source is not None and spec.source.one_noise
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

    def admit_lanes(self, count: int, diffusion: GaussianDiffusion, shape: tuple[int, ...],
                    device: torch.device) -> list[Lane]:
        first = len(self.lanes)
        indices = range(first, first + count)
        cursors = [self.starts[index].cursor for index in indices]
        streams = [NoiseStream(self.seed, 0 if self.one_noise else index, shape, self._draws(cursor))
                   for index, cursor in zip(indices, cursors, strict=True)]
        x_start = stack_to([self._first_sample(index, stream[0], cursor, diffusion)
                            for index, stream, cursor in zip(indices, streams, cursors, strict=True)], device).unbind(0)
        lanes = [Lane(self, index, self.lane_plans[index], stream, x, cursor, self._known_region(index, cursor))
                 for index, stream, x, cursor in zip(indices, streams, x_start, cursors, strict=True)]
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

    def _draws(self, cursor: int) -> int:
        """A lane's normal draws: its first sample, then a z per step it runs if its sampler adds noise."""
        return 1 + (len(self.plan) - cursor if self.plan.noisy else 0)

    def _first_sample(self, index: int, first_draw: torch.Tensor, cursor: int,
                      diffusion: GaussianDiffusion) -> torch.Tensor:
        """x_T, or for a lane starting later the image encoded at its first timestep."""
        if cursor == 0:
            return first_draw
        return encode(diffusion, self.starts[index].image, self.plan.timesteps[cursor], first_draw)

    def _known_region(self, index: int, cursor: int) -> KnownRegion | None:
        start, plan = self.starts[index], self.lane_plans[index]
        if start.keep is None:
            return None
        return KnownRegion(start, self.image_seed(index), len(plan) - cursor, len(plan.jumps))

    def image_seed(self, index: int) -> int:
        return self.seed if self.one_noise else image_seed(self.seed, index)
