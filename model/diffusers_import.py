"""Load a diffusers-format DDPM folder (e.g. google/ddpm-cifar10-32) with no conversion step.

Accepts the pipeline folder (unet/ + scheduler/) or the unet folder alone (then the paper's
schedule is assumed). Our U-Net uses diffusers' module names, so only legacy attention keys
(query/key/value/proj_attn) need renaming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .checkpoint import CheckpointError
from .config import DiffusionConfig, ModelConfig, UNetConfig

LEGACY_ATTENTION_KEYS = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

# UNet2DModel's constructor defaults: what diffusers builds when a config.json omits a field.
# Several are not the paper's, so an absent field is read as this value, never as ours.
UNET2D_DEFAULTS: dict[str, Any] = {
    "act_fn": "silu",
    "add_attention": True,
    "attention_head_dim": 8,
    "attn_norm_num_groups": None,
    "center_input_sample": False,
    "class_embed_type": None,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 3,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2D",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "out_channels": 3,
    "resnet_time_scale_shift": "default",
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "upsample_type": "conv",
}

# Fields whose value must be the original DDPM's for our U-Net to compute the same function.
REQUIRED_UNET_FIELDS = {
    "act_fn": "silu",
    "add_attention": True,
    "center_input_sample": False,
    "class_embed_type": None,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2D",
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "upsample_type": "conv",
}
DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "unet" / "config.json").is_file() or (path / "config.json").is_file())


def unet_config_from_diffusers(cfg: dict[str, Any], source: str) -> UNetConfig:
    def field(name: str) -> Any:
        return cfg.get(name, UNET2D_DEFAULTS[name])

    kind = cfg.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise CheckpointError(f"{source}: config.json describes a {kind}, not a UNet2DModel")
    for name, value in REQUIRED_UNET_FIELDS.items():
        if field(name) != value:
            absent = "" if name in cfg else " (absent, so UNet2DModel's default)"
            raise CheckpointError(
                f"{source}: unsupported diffusers UNet2DModel {name}={field(name)!r}{absent}; need {value!r}"
            )
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise CheckpointError(f"{source}: block_out_channels {channels} are not multiples of {base}")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"{source}: non-square sample_size {size} is not supported")
        size = size[0]
    down = list(cfg["down_block_types"])
    if any(kind not in DOWN_BLOCK_TYPES for kind in down):
        raise CheckpointError(f"{source}: down_block_types {down} must each be one of {DOWN_BLOCK_TYPES}")
    attention = tuple(size // 2**i for i, kind in enumerate(down) if kind == "AttnDownBlock2D")
    expected_up = [kind.replace("Down", "Up") for kind in reversed(down)]
    if list(cfg["up_block_types"]) != expected_up:
        raise CheckpointError(f"{source}: up_block_types {cfg['up_block_types']} do not mirror {down}")
    # One attention head everywhere, the middle block's included (its width is the last level's).
    head_dim = field("attention_head_dim")
    attended = [c for c, kind in zip(channels, down, strict=True) if kind == "AttnDownBlock2D"] + channels[-1:]
    if head_dim is not None and any(c != head_dim for c in attended):
        raise CheckpointError(f"{source}: multi-head attention (attention_head_dim={head_dim}) is not supported")
    norm_groups = field("norm_num_groups")
    if field("attn_norm_num_groups") not in (None, norm_groups):
        raise CheckpointError(f"{source}: attn_norm_num_groups differs from norm_num_groups={norm_groups}")
    return UNetConfig(
        image_size=size,
        in_channels=field("in_channels"),
        out_channels=field("out_channels"),
        base_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=cfg["layers_per_block"],
        attention_resolutions=attention,
        dropout=field("dropout"),
        norm_groups=norm_groups,
        norm_eps=field("norm_eps"),
    )


def diffusion_config_from_diffusers(cfg: dict[str, Any], source: str) -> DiffusionConfig:
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{source}: prediction_type {cfg['prediction_type']!r} unsupported (need 'epsilon')")
    schedules = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
    variances = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall"}
    schedule = cfg.get("beta_schedule", "linear")
    variance = cfg.get("variance_type", "fixed_small")
    if schedule not in schedules or variance not in variances:
        raise CheckpointError(f"{source}: unsupported beta_schedule {schedule!r} or variance_type {variance!r}")
    # Options that change the betas or the x0 clipping our samplers apply: refuse, don't ignore.
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"{source}: trained_betas are not supported (only linear and cosine schedules)")
    if cfg.get("thresholding", False) or cfg.get("clip_sample_range", 1.0) != 1.0:
        raise CheckpointError(f"{source}: only clipping x0 to [-1, 1] is supported (no thresholding or other range)")
    return DiffusionConfig(
        num_timesteps=cfg.get("num_train_timesteps", 1000),
        schedule=schedules[schedule],
        beta_start=cfg.get("beta_start", 1e-4),
        beta_end=cfg.get("beta_end", 0.02),
        variance_type=variances[variance],
        clip_x0=cfg.get("clip_sample", True),
    )


def read_unet_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    st, binary = unet_dir / "diffusion_pytorch_model.safetensors", unet_dir / "diffusion_pytorch_model.bin"
    try:
        if st.is_file():
            state = load_file(str(st))
        elif binary.is_file():
            state = torch.load(binary, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{unet_dir}: no diffusion_pytorch_model.safetensors or .bin")
    except CheckpointError:
        raise
    except Exception as exc:  # any reader failure means a broken file
        raise CheckpointError(f"{unet_dir}: unreadable weights (corrupt or truncated?): {exc}") from exc
    return {rename_legacy_key(k): v for k, v in state.items()}


def rename_legacy_key(key: str) -> str:
    for old, new in LEGACY_ATTENTION_KEYS.items():
        if old in key:
            return key.replace(old, new)
    return key


def read_diffusers_folder(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    try:
        unet_cfg = json.loads((unet_dir / "config.json").read_text())
        sched_cfg = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable diffusers config: {exc}") from exc
    if not isinstance(unet_cfg, dict) or not isinstance(sched_cfg, dict):
        raise CheckpointError(f"{path}: diffusers config files must hold JSON objects")
    try:
        config = ModelConfig(
            unet=unet_config_from_diffusers(unet_cfg, str(path)),
            diffusion=diffusion_config_from_diffusers(sched_cfg, str(path)),
        )
    except (KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: diffusers config does not describe a DDPM U-Net: {exc}") from exc
    info = {"source": "diffusers", "path": str(path)}
    return read_unet_weights(unet_dir), config, {"kind": "inference", "info": info}
