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
from .diffusion import GaussianDiffusion
from .inference import prepare_for_inference
from .precision import resolve_dtype
from .samplers import NoiseStream, Slot, denoise_step, make_plan, next_carried, stack_to
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
    def dtype(self) -> torch.dtype:
        """The U-Net's compute dtype (model.load's `dtype`); samples are float32 whatever it is."""
        return next(self.unet.parameters()).dtype

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
        """n images in [-1, 1], [n, C, H, W]. Image i draws all its noise on the CPU from its own
        generator, seeded by image_seed(seed, first_index + i) (image 0: the seed itself), so it is
        the same whatever batch and device it is computed on, and sample(1, seed=image_seed(seed, i))
        gives it alone. `first_index` continues a request in batches: images k.. of sample(N, seed)
        alone. `on_step` is called after each denoising step (for progress bars)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        plan = make_plan(self.diffusion, sampler, self.diffusion.num_timesteps if steps is None else steps, eta)
        seed = secrets.randbits(63) if seed is None else seed
        device = self.device
        streams = [NoiseStream(seed, first_index + i, self.image_shape, plan.draws) for i in range(n)]
        x = stack_to([stream[0] for stream in streams], device)
        if noise is not None:
            if tuple(noise.shape) != tuple(x.shape):
                raise ValueError(f"noise must have shape {tuple(x.shape)} (n, C, H, W), got {tuple(noise.shape)}")
            x = noise.to(device=device, dtype=x.dtype)
        carried: dict[Slot, torch.Tensor] = {}  # what a multistep sampler keeps between steps
        with eval_mode(self.unet):
            for i, (t, coefs) in enumerate(zip(plan.timesteps.tolist(), plan.coefs, strict=True)):
                eps = self.unet(x, torch.full((n,), t, device=device, dtype=torch.long))
                slots = {Slot.X_T: x, Slot.EPS: eps, **carried}
                if plan.noisy:
                    slots[Slot.NOISE] = stack_to([stream[i + 1] for stream in streams], device)
                step = denoise_step(coefs.expand(n, -1), slots, plan.corrects)
                carried = next_carried(carried, step.x0, step.corrected, plan.carries)
                x = step.x_next
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


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str = "auto") -> DDPM:
    """Our .safetensors file (inference or training checkpoint), or a diffusers DDPM folder.
    `dtype`: the U-Net's compute dtype, "auto" (bfloat16 where `device` computes it natively,
    else float32), "float32", "bfloat16" or "float16" (model.precision); sampling stays float32."""
    compute_dtype = resolve_dtype(dtype, device)  # first: a bad name fails before any reading
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
    unet = prepare_for_inference(unet.to(device=device, dtype=compute_dtype), config.diffusion.num_timesteps)
    return DDPM(unet, config, metadata.get("info", {}))


def save(ddpm: DDPM, path: str | os.PathLike) -> None:
    write_checkpoint(path, ddpm.unet.state_dict(), ddpm.config, kind="inference", info=ddpm.info)
