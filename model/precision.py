"""The U-Net's compute dtype: model.load(path, device, dtype="auto").

Only the U-Net runs in it; x_t, the schedules, the sampler update and the noise stay float32
(the U-Net casts at its boundary: float32 x_t in, float32 eps out). "auto" picks bfloat16 where
the hardware computes it natively, float32 elsewhere: on a CPU without native bf16, PyTorch
emulates it and the U-Net runs slower than in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)

# CPU features with bf16 dot products in hardware, as torch.cpu.get_capabilities() and Linux's
# /proc/cpuinfo both name them: where oneDNN's bf16 convolutions beat its fp32 ones.
NATIVE_BF16_CPU_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_features() -> frozenset[str]:
    """This CPU's instruction-set features: torch's cpuinfo where this torch exposes it (newer
    releases), else the flags of /proc/cpuinfo (Linux); empty where neither can tell."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return frozenset(name for name, present in capabilities().items() if present is True)
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), "")
    return frozenset(flags.split())


def cpu_has_native_bf16() -> bool:
    return not NATIVE_BF16_CPU_FEATURES.isdisjoint(cpu_features())


def cuda_has_native_bf16(device: torch.device) -> bool:
    """torch.cuda.is_bf16_supported's own rule (ROCm, or compute capability 8.0, Ampere, and
    later), for this device rather than the current one, and without its "yes" for older GPUs
    that only emulate bf16 (its including_emulation flag is missing from older torch releases)."""
    return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether `device` has bf16 arithmetic in hardware (elsewhere, mps included: no)."""
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The dtype named by `name` (one of DTYPE_CHOICES) for a U-Net on `device`."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}")
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if computes_bf16_natively(torch.device(device)) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name the options use."""
    return str(dtype).removeprefix("torch.")
