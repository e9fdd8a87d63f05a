"""The DDPM of Ho, Jain & Abbeel (2020) in pure PyTorch.

    ddpm = model.load(path, device="cpu")   # our .safetensors file, or a diffusers folder
    eps = ddpm.unet(x, t)                    # x: [B,C,H,W] in [-1,1], t: LongTensor [B]
    imgs = ddpm.sample(n, steps=1000, sampler="ddpm", eta=0.0, seed=0)
    model.save(ddpm, path)
"""

from .checkpoint import CheckpointError
from .config import PRESETS, DiffusionConfig, ModelConfig, UNetConfig, preset
from .diffusion import GaussianDiffusion
from .pipeline import DDPM, load, save
from .unet import UNet

__all__ = [
    "PRESETS",
    "CheckpointError",
    "DDPM",
    "DiffusionConfig",
    "GaussianDiffusion",
    "ModelConfig",
    "UNet",
    "UNetConfig",
    "load",
    "preset",
    "save",
]
