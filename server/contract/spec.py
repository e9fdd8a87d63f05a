"""What a client may ask for, and the one place where a request is checked.

`GenerationSpec` is a request as given: any caller can build one. `validate` checks it against
the served model's `RequestLimits` and returns a `ValidSpec`, the only kind an engine accepts:
every field in range, the step count and the seed resolved. Nothing else builds a ValidSpec.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Literal, get_args

from .sources import MAX_RESAMPLING, OPERATIONS, RESAMPLING_SAMPLERS, Picture, Source, resampled_steps

# The model's samplers (model.samplers.SAMPLERS; a test proves the two agree) and the kinds
# of preview frame: x_t, the noisy image, or x0, the model's current guess of the final one.
SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
FrameKind = Literal["x_t", "x0"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
FRAME_KINDS: tuple[str, ...] = get_args(FrameKind)

# steps=None: the model's T for the paper's sampler and DDIM; the multistep solvers reach the
# probability-flow ODE's limit in far fewer U-Net calls (measured on the shipped model:
# dpmpp_2m at 15 steps scores as ddim at 100; weights/README.md), and a user pays for every call.
SOLVER_DEFAULT_STEPS = {"dpmpp_2m": 20, "unipc": 20, "dpmpp_2m_sde": 50}
MAX_SEED = 2**63 - 1  # seeds are 63-bit: drawn with secrets.randbits(63)
ETA_RANGE = (0.0, 1.0)  # DDIM's eta: 0 deterministic, 1 as noisy as DDPM
DEFAULT_MAX_IMAGES_PER_REQUEST = 16


class InvalidSpec(ValueError):
    """A request the served model cannot run; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    """What the served model and its engine allow one request (ModelInfo.limits)."""

    num_timesteps: int  # the model's T: the most steps a request may take
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of input images; None: none accepted


@dataclass(frozen=True)
class GenerationSpec:
    """A request as given: n images from one sampler. steps=None: default_steps(sampler, T)."""

    n: int = 1
    steps: int | None = None
    sampler: str = "ddpm"
    eta: float = 0.0
    seed: int | None = None  # None: one is drawn at validation and reported back
    preview_every: int = 0  # publish frames every k steps (0: none)
    preview_kinds: tuple[str, ...] = FRAME_KINDS
    timeout_s: float | None = None  # deadline from submission; None: the engine's default
    owner: str | None = None  # who submitted it (an API key id); used for visibility and per-owner limits
    source: Source | None = None  # image-to-image: where the lanes start (None: pure noise)


_PROOF = object()  # held only by validate: a ValidSpec cannot be built anywhere else


@dataclass(frozen=True)
class ValidSpec:
    """A request that `validate` checked against `limits`; steps and seed are resolved."""

    n: int
    steps: int
    sampler: SamplerName
    eta: float
    seed: int
    preview_every: int
    preview_kinds: tuple[FrameKind, ...]
    timeout_s: float | None
    owner: str | None
    limits: RequestLimits
    source: Source | None
    _proof: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._proof is not _PROOF:
            raise TypeError("a ValidSpec comes only from server.contract.validate(spec, limits)")


def validate(spec: GenerationSpec, limits: RequestLimits) -> ValidSpec:
    """`spec` checked against `limits`, or InvalidSpec naming the first bad field and its range."""
    n = check_int("n", spec.n, 1, limits.max_images_per_request)
    if spec.sampler not in SAMPLER_NAMES:
        raise InvalidSpec("sampler", f"sampler must be one of {list(SAMPLER_NAMES)}, got {spec.sampler!r}")
    steps = default_steps(spec.sampler, limits.num_timesteps) if spec.steps is None else check_int(
        "steps", spec.steps, 1, limits.num_timesteps, " (the model's T)")
    if spec.source is not None:
        n = check_source(spec.source, spec.sampler, steps, limits) or n
    eta = check_float("eta", spec.eta, *ETA_RANGE)
    if eta and spec.sampler != "ddim":
        raise InvalidSpec("eta", f"eta applies to the ddim sampler only; {spec.sampler} takes eta = 0")
    seed = secrets.randbits(63) if spec.seed is None else check_int("seed", spec.seed, 0, MAX_SEED)
    preview_every = check_int("preview_every", spec.preview_every, 0, None, " (0: no previews)")
    kinds = tuple(dict.fromkeys(spec.preview_kinds))
    if not kinds or not set(kinds) <= set(FRAME_KINDS):
        raise InvalidSpec("preview_kinds",
                          f"preview_kinds must be a non-empty list from {list(FRAME_KINDS)}, got {list(kinds)}")
    if spec.timeout_s is not None:
        check_float("timeout_s", spec.timeout_s, 0.0, None, exclusive_min=True)
    return ValidSpec(n, steps, spec.sampler, eta, seed, preview_every, kinds, spec.timeout_s, spec.owner,
                     limits, spec.source, _PROOF)


def default_steps(sampler: str, num_timesteps: int) -> int:
    """The steps of a request that names none (SOLVER_DEFAULT_STEPS, else T)."""
    return min(SOLVER_DEFAULT_STEPS.get(sampler, num_timesteps), num_timesteps)


def check_source(source: Source, sampler: str, steps: int, limits: RequestLimits) -> int | None:
    """InvalidSpec unless `source` fits the model; returns the image count it fixes, if any."""
    if source.operation not in OPERATIONS:
        raise InvalidSpec("operation", f"operation must be one of {list(OPERATIONS)}, got {source.operation!r}")
    check_picture("image", source.image, limits)
    op = source.operation
    if op == "variation":
        check_float("strength", source.strength, 0.0, 1.0, exclusive_min=True)
    elif op == "inpaint":
        _, h, w = source.image.shape
        if source.keep is None or len(source.keep) != h * w:
            raise InvalidSpec("mask", f"inpainting needs a mask of the image's size ({w}x{h})")
        check_resampling(source, sampler, steps, limits)
    elif op == "interpolate":
        if source.other is None:
            raise InvalidSpec("image2", "interpolation needs a second image")
        check_picture("image2", source.other, limits)
        check_list("lambdas", source.lambdas, limits)
        for value in source.lambdas:
            check_float("lambdas", value, 0.0, 1.0)
        check_int("t", source.t, 1, limits.num_timesteps, " (the model's T)")
    else:
        check_list("timesteps", source.timesteps, limits)
        for value in source.timesteps:
            check_int("timesteps", value, 1, limits.num_timesteps, " (the model's T)")
    return source.image_count


def check_resampling(source: Source, sampler: str, steps: int, limits: RequestLimits) -> None:
    check_int("jump_length", source.jump_length, 1, limits.num_timesteps, " (the model's T)")
    check_int("jump_n_sample", source.jump_n_sample, 1, None, " (1: no resampling)")
    if source.jump_n_sample == 1:
        return
    if sampler not in RESAMPLING_SAMPLERS:
        raise InvalidSpec("sampler", f"RePaint's resampling works with {list(RESAMPLING_SAMPLERS)}, got {sampler!r}")
    calls, most = resampled_steps(steps, source.jump_length, source.jump_n_sample), limits.num_timesteps * MAX_RESAMPLING
    if calls > most:
        raise InvalidSpec("jump_n_sample", f"{steps} steps with jump_length {source.jump_length} and jump_n_sample "
                                           f"{source.jump_n_sample} take {calls} U-Net calls per image; at most {most} "
                                           f"({MAX_RESAMPLING} x T)")


def check_picture(name: str, picture: object, limits: RequestLimits) -> None:
    if limits.image_shape is None:
        raise InvalidSpec(name, "this engine takes no input images")
    if not isinstance(picture, Picture) or picture.shape != limits.image_shape:
        c, h, w = limits.image_shape
        raise InvalidSpec(name, f"{name} must be a {w}x{h} image with {c} channel(s)")


def check_list(name: str, values: tuple, limits: RequestLimits) -> None:
    if not 1 <= len(values) <= limits.max_images_per_request:
        raise InvalidSpec(name, f"{name} must hold 1 to {limits.max_images_per_request} values (one image each), "
                                f"got {len(values)}")


def check_int(name: str, value: object, low: int, high: int | None, note: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidSpec(name, f"{name} must be an integer, got {value!r}")
    return check_range(name, value, low, high, note)


def check_float(name: str, value: object, low: float, high: float | None, exclusive_min: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidSpec(name, f"{name} must be a finite number, got {value!r}")
    if exclusive_min and value == low:
        raise InvalidSpec(name, f"{name} must be > {number(low)}, got {value!r}")
    return float(check_range(name, value, low, high))


def check_range(name: str, value: float, low: float, high: float | None, note: str = "") -> float:
    if value < low or (high is not None and value > high):
        allowed = f"between {number(low)} and {number(high)}" if high is not None else f">= {number(low)}"
        raise InvalidSpec(name, f"{name} must be {allowed}{note}, got {value!r}")
    return value


def number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
