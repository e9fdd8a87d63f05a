"""What every sampler shares: a per-request plan of coefficients, and one batched step.

A sampler turns (schedule, number of steps, options) into a SamplingPlan: the model timesteps to
visit and, for each step, the coefficients of one formula over the slots of a lane's state:

    x0_hat    = clip(a * x_t - b * eps_hat)
    x_next    = sum over slots s of  next[s] * s
    corrected = sum over slots s of  corrected[s] * s       (UniPC's corrector; 0 elsewhere)

The slots (Slot) are x0_hat, x_t, eps_hat, fresh noise z, the x0_hat of the two previous steps
and UniPC's last corrected sample. Ancestral DDPM and DDIM use the first four; DPM-Solver++(2M),
with or without noise, and UniPC are multistep solvers, i.e. linear combinations over the
history a lane carries. `denoise_step` applies the formula to a batch whose rows may come from
different plans at different steps: each row brings its own coefficients, and a slot no row
holds is left out of the sums, so batching never changes one image's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch


class Slot(IntEnum):
    """What a step's combinations read, in the order they are summed. x0_hat, x_t, eps_hat, z
    first: the order of the original four-term DDPM/DDIM formula, so those stay bit-identical."""

    X0 = 0  # x0_hat of this step, after clipping
    X_T = 1  # the lane's sample at this step: the U-Net's input
    EPS = 2  # eps_hat, the U-Net's output
    NOISE = 3  # z ~ N(0, I), the lane's draw for this step
    PREV_X0 = 4  # x0_hat of the previous step
    PREV_PREV_X0 = 5  # x0_hat of the step before that
    CORRECTED = 6  # UniPC: the previous step's corrected sample, where its predictor started


# What a lane keeps from one step to the next besides x_t (see next_carried).
CARRIED = (Slot.PREV_X0, Slot.PREV_PREV_X0, Slot.CORRECTED)


class Coef(IntEnum):
    """The columns of SamplingPlan.coefs before the two combinations."""

    # x0_hat = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps_hat  (DDPM eq. 15; DDIM eq. 12)
    X0_FROM_XT = 0
    X0_FROM_EPS = 1
    # x0_hat is clipped to [-X0_BOUND, X0_BOUND]: 1 when the model's config clips, else inf
    X0_BOUND = 2


NEXT_COLUMNS = len(Coef)  # column NEXT_COLUMNS + s holds slot s's weight in x_next
CORRECTED_COLUMNS = NEXT_COLUMNS + len(Slot)  # column CORRECTED_COLUMNS + s: in the corrected sample
COLUMNS = CORRECTED_COLUMNS + len(Slot)
SUM_ORDER = tuple(Slot)


def next_column(slot: Slot) -> int:
    return NEXT_COLUMNS + slot


def corrected_column(slot: Slot) -> int:
    return CORRECTED_COLUMNS + slot


REACHES_X0 = -1  # SamplingPlan.reaches of a step that lands on x_0


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: torch.Tensor  # [N] long: the t given to the model at step i
    coefs: torch.Tensor  # [N, COLUMNS] float64: Coef, then next_column(s), then corrected_column(s)
    reads: frozenset[Slot]  # slots with a weight anywhere in the plan
    corrects: bool  # whether a step computes a corrected sample (UniPC)
    # [N] long: the timestep step i lands on (REACHES_X0: x_0). The next step's timestep, except
    # where RePaint's resampling (samplers.repaint) jumps back up before the next step.
    reaches: torch.Tensor

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    @property
    def noisy(self) -> bool:
        """Whether any step adds fresh noise: only then does a lane draw more than x_T."""
        return Slot.NOISE in self.reads

    @property
    def draws(self) -> int:
        """Normal draws per image: x_T, then one z per step when a step adds noise."""
        return 1 + len(self) if self.noisy else 1

    @property
    def carries(self) -> frozenset[Slot]:
        return self.reads & frozenset(CARRIED)


Weights = dict[Slot, torch.Tensor]  # one [N] tensor per slot; absent slots weigh 0


def build_plan(timesteps: torch.Tensor, x0_coefs: tuple[torch.Tensor, torch.Tensor], clip_x0: bool,
               next_weights: Weights, corrected_weights: Weights | None = None) -> SamplingPlan:
    """The plan of a sampler whose step i computes x0_hat with x0_coefs[k][i], then
    x_next = sum next_weights[s][i] * s and corrected = sum corrected_weights[s][i] * s."""
    coefs = torch.zeros(len(timesteps), COLUMNS, dtype=torch.float64)
    coefs[:, Coef.X0_FROM_XT], coefs[:, Coef.X0_FROM_EPS] = x0_coefs
    coefs[:, Coef.X0_BOUND] = 1.0 if clip_x0 else float("inf")
    for slot, weight in next_weights.items():
        coefs[:, next_column(slot)] = weight
    for slot, weight in (corrected_weights or {}).items():
        coefs[:, corrected_column(slot)] = weight
    weights = coefs[:, NEXT_COLUMNS:].view(len(timesteps), 2, len(Slot))  # [N, (next, corrected), slot]
    used = weights.ne(0).flatten(0, 1).any(dim=0)
    reaches = torch.cat([timesteps[1:], torch.tensor([REACHES_X0])])
    return SamplingPlan(timesteps, coefs, frozenset(slot for slot in Slot if used[slot]), corrected_weights is not None,
                        reaches)


def spaced_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """diffusers' 'leading' spacing: arange(steps) * (T // steps), descending (T=1000, 50 -> 980..0)."""
    check_steps(num_timesteps, steps)
    return (torch.arange(steps, dtype=torch.long) * (num_timesteps // steps)).flip(0)


def linspace_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """diffusers' 'linspace' spacing, the default of its multistep solvers: T-1 down to about
    T / steps, evenly (T=1000, 10 -> 999, 899, ..., 100). The last step goes to x_0 from there.
    At steps = T diffusers' rounding visits t = 500 twice (a zero-length step its second-order
    update divides by); every t once is what that spacing means there."""
    check_steps(num_timesteps, steps)
    if steps == num_timesteps:
        return torch.arange(num_timesteps - 1, -1, -1, dtype=torch.long)
    # numpy's linspace and round-half-to-even, exactly as diffusers computes it
    spaced = np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return torch.from_numpy(spaced.copy())


def check_steps(num_timesteps: int, steps: int) -> None:
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")


def alphas_cumprod_pairs(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor):
    """abar at each visited t and at the next visited t (1 past the last step)."""
    abar_t = alphas_cumprod[timesteps]
    abar_prev = torch.cat([alphas_cumprod[timesteps[1:]], torch.ones(1, dtype=torch.float64)])
    return abar_t, abar_prev


def x0_coefs(abar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns X0_FROM_XT and X0_FROM_EPS (Ho et al. 2020, eq. 15)."""
    return torch.sqrt(1.0 / abar_t), torch.sqrt(1.0 / abar_t - 1.0)


@dataclass(frozen=True)
class LogSnrGrid:
    """Where a solver of the diffusion ODE steps, in the notation of DPM-Solver (Lu et al. 2022,
    sec. 2): alpha = sqrt(abar), sigma = sqrt(1 - abar) and the half log-SNR lam = log(alpha / sigma)
    at each visited t_i, then at the end of the last step (alpha 1, sigma 0, lam inf: x_0 itself).
    Each is [N + 1]; step i goes from index i to index i + 1."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor

    @classmethod
    def of(cls, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> "LogSnrGrid":
        abar = torch.cat([alphas_cumprod[timesteps], torch.ones(1, dtype=torch.float64)])
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        return cls(alpha, sigma, alpha.log() - sigma.log())

    @property
    def h(self) -> torch.Tensor:
        """[N]: each step's length in lam (inf for the last, which lands on sigma = 0)."""
        return self.lam[1:] - self.lam[:-1]

    @property
    def sigma_ratio(self) -> torch.Tensor:
        """[N]: sigma_{i+1} / sigma_i, the weight of the starting sample in every exponential
        integrator step of the data-prediction ODE."""
        return self.sigma[1:] / self.sigma[:-1]


@dataclass(frozen=True)
class StepOutput:
    x_next: torch.Tensor
    x0: torch.Tensor
    corrected: torch.Tensor | None  # None when no row of the batch corrects


def denoise_step(coefs: torch.Tensor, slots: dict[Slot, torch.Tensor], corrects: bool = False) -> StepOutput:
    """One step for a batch. coefs: [B, COLUMNS], rows of plans; slots: [B, C, H, W] per slot,
    X_T and EPS always, any other slot that some row holds (rows without it hold zeros there).
    A slot left out must weigh 0 in every row: leaving out a zero term changes no bit (x + 0 = x)."""
    x_t = slots[Slot.X_T]
    # c[k]: column k as [B, 1, 1, 1]; indexing only the columns in use is cheaper than unbinding all
    c = coefs.to(device=x_t.device, dtype=x_t.dtype).t()[:, :, None, None, None]
    x0 = c[Coef.X0_FROM_XT] * x_t - c[Coef.X0_FROM_EPS] * slots[Slot.EPS]
    bound = c[Coef.X0_BOUND]
    x0 = x0.clamp(-bound, bound)
    slots = {Slot.X0: x0, **slots}
    x_next = combine(c, NEXT_COLUMNS, slots)
    corrected = combine(c, CORRECTED_COLUMNS, slots) if corrects else None
    return StepOutput(x_next, x0, corrected)


def combine(c: torch.Tensor, first_column: int, slots: dict[Slot, torch.Tensor]) -> torch.Tensor:
    """sum of c[first_column + s] * slots[s] over the slots present, in Slot order: one fixed
    rounding, separate multiplies and adds (never fused), so a row's bits never depend on its batch."""
    total = None
    for slot in SUM_ORDER:
        if slot in slots:
            term = c[first_column + slot] * slots[slot]
            total = term if total is None else total + term
    return total


def next_carried(carried: dict[Slot, torch.Tensor], output_x0: torch.Tensor,
                 output_corrected: torch.Tensor | None, keep: frozenset[Slot]) -> dict[Slot, torch.Tensor]:
    """The carried slots for the next step, of those in `keep`: the history shifts by one."""
    following = {Slot.PREV_X0: output_x0, Slot.PREV_PREV_X0: carried.get(Slot.PREV_X0),
                 Slot.CORRECTED: output_corrected}
    return {slot: value for slot, value in following.items() if slot in keep and value is not None}


def derived_seed(seed: int, key: int) -> int:
    """A seed in [0, 2**63) for stream `key` of `seed`: independent of every other (seed, key)."""
    return int(np.random.SeedSequence([seed, key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request: the request seed itself for image 0, a derived,
    independent one for the others. So the seed reported for image i, given as the seed of a
    one-image request, gives image i again: sample(1, seed=image_seed(s, i)) == sample(n, seed=s)[i]."""
    return seed if index == 0 else derived_seed(seed, index)


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(image_seed(seed, index))
