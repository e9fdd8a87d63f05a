"""Typed, frozen configuration for the U-Net and the diffusion process.

The config is saved inside every checkpoint (as JSON in the safetensors metadata), so a
weights file always carries what is needed to rebuild its model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ScheduleName = Literal["linear", "cosine"]
VarianceType = Literal["fixedlarge", "fixedsmall"]


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    norm_groups: int = 32
    norm_eps: float = 1e-6
    resample_with_conv: bool = True

    def __post_init__(self) -> None:
        # Tuples survive a JSON round trip as lists; normalise so configs compare equal.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"channels {self.base_channels * mult} not divisible by norm_groups {self.norm_groups}"
                )
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**{len(self.channel_mult) - 1}"
            )


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000
    schedule: ScheduleName = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance_type: VarianceType = "fixedlarge"
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'linear' or 'cosine'")
        if self.variance_type not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"unknown variance_type {self.variance_type!r}")
        if self.num_timesteps < 1:
            raise ValueError("num_timesteps must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        try:
            return cls(unet=UNetConfig(**data["unet"]), diffusion=DiffusionConfig(**data["diffusion"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid model config: {exc}") from exc


PRESETS: dict[str, ModelConfig] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters.
    "cifar10": ModelConfig(),
    # The 256x256 LSUN / CelebA-HQ models (114M parameters), sampled with fixedsmall.
    "lsun256": ModelConfig(
        unet=UNetConfig(image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
        diffusion=DiffusionConfig(variance_type="fixedsmall"),
    ),
    # CPU-friendly MNIST model (1.1M parameters): the shipped default. Attention only in the
    # middle (7x7): at 14x14 it doubled the training cost on a 2-core CPU.
    "mnist": ModelConfig(
        unet=UNetConfig(
            image_size=28,
            in_channels=1,
            out_channels=1,
            base_channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            dropout=0.1,
            norm_groups=8,
        )
    ),
    # A tiny MNIST-shaped model for tests and smoke runs.
    "tiny": ModelConfig(
        unet=UNetConfig(
            image_size=28,
            in_channels=1,
            out_channels=1,
            base_channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(14,),
            dropout=0.0,
            norm_groups=8,
        ),
        diffusion=DiffusionConfig(num_timesteps=50),
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
