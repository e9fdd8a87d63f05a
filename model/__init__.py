"""The DDPM of Ho, Jain & Abbeel (2020) in pure PyTorch.

    ddpm = model.load(path, device="cpu")   # our .safetensors file, or a diffusers folder
    eps = ddpm.unet(x, t)                    # x: [B,C,H,W] in [-1,1], t: LongTensor [B]
    imgs = ddpm.sample(n, steps=1000, sampler="ddpm", eta=0.0, seed=0)
    model.save(ddpm, path)

The names below load on first use: `import model` alone does not load torch, so ddpm-train and
ddpm-eval can set the OpenMP wait policy before it loads (model.threads).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "DiffusionConfig": "config",
    "ModelConfig": "config",
    "PRESETS": "config",
    "UNetConfig": "config",
    "preset": "config",
    "GaussianDiffusion": "diffusion",
    "DDPM": "pipeline",
    "load": "pipeline",
    "save": "pipeline",
    "UNet": "unet",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .checkpoint import CheckpointError
    from .config import PRESETS, DiffusionConfig, ModelConfig, UNetConfig, preset
    from .diffusion import GaussianDiffusion
    from .pipeline import DDPM, load, save
    from .unet import UNet
