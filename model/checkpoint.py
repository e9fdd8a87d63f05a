"""Our checkpoint format: one .safetensors file, the config as JSON in its metadata.

Metadata keys: format ("ddpm-serve"), format_version, kind ("inference" or "training"),
config (ModelConfig as JSON) and info (free-form JSON: dataset, training step, ...).
An inference file holds the (EMA) U-Net weights under their module names; a training file
holds them under "ema.", the raw weights under "model." and the optimizer under "optim.".
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .config import ModelConfig

FORMAT = "ddpm-serve"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A weights file that is missing, corrupt, truncated or does not fit its model."""


def write_checkpoint(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: ModelConfig, kind: str, info: dict | None = None
) -> None:
    """Write atomically: a temp file in the same folder, then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": json.dumps(config.to_dict()),
        "info": json.dumps(info or {}),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; weights are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Returns (tensors, config, metadata) or raises CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (metadata has no format={FORMAT!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: format version {version}, this program reads version {FORMAT_VERSION}")
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        metadata["info"] = json.loads(metadata.get("info", "{}"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad config in metadata: {exc}") from exc
    return tensors, config, metadata


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that names the file and the keys that do not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{source}: weights do not fit the model config: " + "; ".join(parts))
    module.load_state_dict(state)
