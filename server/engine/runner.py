"""The model's side of the engine: one batched denoising step over lanes of any requests.

Each lane brings its own timestep, its own sampler coefficients, its own noise and, for a
multistep sampler, its own history, so lanes of different samplers, step counts and positions
share one U-Net call:

    t[B], coefs[B, COLUMNS]       gathered from each lane's plan at its cursor (one copy each)
    eps = unet(x_t[B, C, H, W], t)
    slots: z[B] from each lane's CPU noise stream (one copy), history[B] per carried slot
    x_next, x0_hat, corrected = denoise_step(coefs, slots)       (model.samplers.base)

A slot is gathered only when some lane of the batch uses it; lanes without it contribute zeros,
which their zero coefficients ignore. Nothing waits for the device: no value is read back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from model import DDPM
from model.samplers import CARRIED, Slot, denoise_step, make_plan, next_carried, resample, stack_to, tensor_to

from .request import Lane, LanePlan

PLAN_CACHE_SIZE = 64  # distinct plan settings; eta is a free float, so bound it


class Runner:
    def __init__(self, ddpm: DDPM):
        ddpm.unet.eval()
        self.ddpm = ddpm
        self.device = ddpm.device
        self.image_shape = ddpm.image_shape
        self._plans: OrderedDict[tuple, LanePlan] = OrderedDict()
        self._no_noise = torch.zeros(self.image_shape)  # z of a lane whose sampler adds none (CPU)
        self._no_history = torch.zeros(self.image_shape, device=self.device)  # a slot a lane lacks

    @property
    def num_timesteps(self) -> int:
        return self.ddpm.diffusion.num_timesteps

    def plan(self, sampler: str, steps: int, eta: float, start: int = 0,
             resampling: tuple[int, int] | None = None) -> LanePlan:
        """The cached plan for these settings (ValueError for settings no sampler accepts).
        start: for a lane that starts at that step (make_plan's start), indexed like the full plan;
        resampling: (jump_length, jump_n_sample) of RePaint. Lanes hold their plan, so evicting
        one never disturbs a running lane."""
        diffusion = self.ddpm.diffusion

        def build_full() -> LanePlan:
            full = make_plan(diffusion, sampler, steps, eta)
            return LanePlan.of(resample(full, *resampling) if resampling else full, diffusion.schedule.alphas_cumprod)

        full = self._cached((sampler, steps, eta, 0, resampling), build_full)
        if start == 0 or not full.carries:  # without history the rows from `start` on are the same
            return full

        def build_restarted() -> LanePlan:
            tail = make_plan(diffusion, sampler, steps, eta, start)
            return full.restarted(LanePlan.of(tail, diffusion.schedule.alphas_cumprod), start)

        return self._cached((sampler, steps, eta, start, resampling), build_restarted)

    def _cached(self, key: tuple, build: Callable[[], LanePlan]) -> LanePlan:
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        plan = self._plans[key] = build()
        if len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def step(self, lanes: Sequence[Lane]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One reverse step for every lane; returns (x_next, x0_hat) per lane.
        Lanes are not advanced (the caller commits with lane.advance), so a failed step can be
        retried: each lane keeps its history and reads the same noise again."""
        device = self.device
        plans = {lane.plan for lane in lanes}
        carried = frozenset().union(*(plan.carries for plan in plans))
        x_t = torch.stack([lane.x for lane in lanes])
        t = tensor_to([lane.t for lane in lanes], torch.long, device)
        eps = self.ddpm.unet(x_t, t)  # on CUDA it runs while the host gathers the rest
        coefs = tensor_to([lane.coefs for lane in lanes], torch.float32, device)
        slots = {Slot.X_T: x_t, Slot.EPS: eps}
        if carried:
            slots.update(self._gather_history(lanes, carried))
        if any(plan.noisy for plan in plans):
            slots[Slot.NOISE] = stack_to([self._noise_of(lane) for lane in lanes], device)
        out = denoise_step(coefs, slots, corrects=any(plan.corrects for plan in plans))
        x_next = self._keep_known(out.x_next, lanes)
        x0 = out.x0.unbind(0)
        if carried:
            corrected = out.corrected.unbind(0) if out.corrected is not None else [None] * len(lanes)
            for lane, lane_x0, lane_corrected in zip(lanes, x0, corrected, strict=True):
                lane.next_carried = next_carried(lane.carried, lane_x0, lane_corrected, lane.plan.carries)
        return x_next.unbind(0), x0

    def _keep_known(self, x_next: torch.Tensor, lanes: Sequence[Lane]) -> torch.Tensor:
        """Inpainting lanes: their known pixels replaced by the input encoded to the step reached,
        then, where the plan jumps back up (RePaint), the whole sample noised up to the next step."""
        rows = [i for i, lane in enumerate(lanes) if lane.known is not None]
        if not rows:
            return x_next
        known = [lanes[i].known for i in rows]
        reached = [lanes[i].next_t for i in rows]  # None: x_0, where the input itself is kept
        inputs = stack_to([region.image for region in known], self.device)
        noise = stack_to([region.noise[lanes[i].steps_run] for i, region in zip(rows, known, strict=True)], self.device)
        t = tensor_to([0 if t is None else t for t in reached], torch.long, self.device)
        final = tensor_to([t is None for t in reached], torch.bool, self.device)[:, None, None, None]
        targets = torch.where(final, inputs, self.ddpm.diffusion.q_sample(inputs, t, noise))
        keep = stack_to([region.keep for region in known], self.device)
        index = tensor_to(rows, torch.long, self.device)
        x_next = x_next.index_copy(0, index, torch.where(keep, targets, x_next[index]))
        jumping = [(i, lanes[i].jump) for i in rows if lanes[i].jump is not None]
        return self._jump(x_next, jumping, lanes) if jumping else x_next

    def _jump(self, x_next: torch.Tensor, jumping: list, lanes: Sequence[Lane]) -> torch.Tensor:
        """x = kept * x + fresh * z for each (row, Jump): q(x_t | x_s) up to the next step's t."""
        rows, jumps = zip(*jumping, strict=True)
        kept = tensor_to([jump.kept for jump in jumps], torch.float32, self.device)[:, None, None, None]
        fresh = tensor_to([jump.fresh for jump in jumps], torch.float32, self.device)[:, None, None, None]
        z = stack_to([lanes[i].known.jump_noise[jump.ordinal] for i, jump in jumping], self.device)
        index = tensor_to(list(rows), torch.long, self.device)
        return x_next.index_copy(0, index, kept * x_next[index] + fresh * z)

    def _gather_history(self, lanes: Sequence[Lane], carried: frozenset[Slot]) -> dict[Slot, torch.Tensor]:
        """Each carried slot some lane's plan keeps, stacked (zeros for lanes without it)."""
        return {slot: torch.stack([lane.carried.get(slot, self._no_history) for lane in lanes])
                for slot in CARRIED if slot in carried}

    def _noise_of(self, lane: Lane) -> torch.Tensor:
        z = lane.step_noise()
        return self._no_noise if z is None else z
