"""DDPM: a U-Net, its config and its diffusion, with load / save / sample.

model.load prepares the U-Net for inference (model.inference); a DDPM built by hand from a U-Net
runs it as it is, unless its prepare_for_inference() is called. Sampling never prepares.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import CheckpointError, load_state, read_checkpoint, strip_prefix, write_checkpoint
from .config import ModelConfig
from .diffusers_import import is_diffusers_folder, read_diffusers_folder
from .diffusion import GaussianDiffusion, draw_noise
from .inference import prepare_for_inference
from .samplers import denoise_step, image_generator, make_plan
from .unet import UNet


class DDPM:
    def __init__(self, unet: UNet, config: ModelConfig, info: dict[str, Any] | None = None):
        self.unet = unet
        self.config = config
        self.diffusion = GaussianDiffusion(config.diffusion)
        self.info = info or {}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        u = self.config.unet
        return (u.in_channels, u.image_size, u.image_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def prepare_for_inference(self) -> DDPM:
        """Prepare the U-Net in place for sampling (as model.load does); returns self. Changes
        its layout and mode, so not for a U-Net that is still being trained."""
        prepare_for_inference(self.unet, self.diffusion.num_timesteps)
        return self

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        seed: int | None = 0,
        noise: torch.Tensor | None = None,
        first_index: int = 0,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """n images in [-1, 1], [n, C, H, W]. Image i draws all its noise from its own generator,
        seeded by image_seed(seed, first_index + i) (image 0: the seed itself), so it is the same
        whatever batch it is computed in, and sample(1, seed=image_seed(seed, i)) gives it alone.
        `first_index` continues a request in batches: images k.. of sample(N, seed) alone.
        `on_step` is called after each denoising step (for progress bars)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        plan = make_plan(self.diffusion, sampler, self.diffusion.num_timesteps if steps is None else steps, eta)
        seed = secrets.randbits(63) if seed is None else seed
        device = self.device
        generators = [image_generator(seed, first_index + i, device) for i in range(n)]
        x = draw_noise(generators, self.image_shape, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(x.shape):
                raise ValueError(f"noise must have shape {tuple(x.shape)} (n, C, H, W), got {tuple(noise.shape)}")
            x = noise.to(device=device, dtype=x.dtype)
        clip = torch.full((n,), plan.clip_x0)
        with eval_mode(self.unet):
            for t, coefs in zip(plan.timesteps.tolist(), plan.coefs):
                eps = self.unet(x, torch.full((n,), t, device=device, dtype=torch.long))
                z = draw_noise(generators, self.image_shape, device)
                x, _ = denoise_step(x, eps, coefs.expand(n, -1), clip, z)
                if on_step is not None:
                    on_step()
        return x.clamp(-1.0, 1.0)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode (no dropout) inside; after, every submodule back in the mode it had."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> DDPM:
    """Our .safetensors file (inference or training checkpoint), or a diffusers DDPM folder."""
    path = Path(path)
    if is_diffusers_folder(path):
        tensors, config, metadata = read_diffusers_folder(path)
    elif path.is_dir():
        raise CheckpointError(f"{path}: a folder, but not a diffusers model (no unet/config.json or config.json)")
    else:
        tensors, config, metadata = read_checkpoint(path)
        if metadata.get("kind") == "training":
            tensors = strip_prefix(tensors, "ema.")
    unet = UNet(config.unet)
    load_state(unet, tensors, str(path))
    unet = prepare_for_inference(unet.to(device), config.diffusion.num_timesteps)
    return DDPM(unet, config, metadata.get("info", {}))


def save(ddpm: DDPM, path: str | os.PathLike) -> None:
    write_checkpoint(path, ddpm.unet.state_dict(), ddpm.config, kind="inference", info=ddpm.info)
