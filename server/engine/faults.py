"""What a failed step says about the device: out of memory, broken for good, or neither.

- Out of memory: the engine halves its batch cap and retries (torch.OutOfMemoryError is missing
  from torch 2.3, the oldest pyproject admits: `OutOfMemoryError` is the name that exists).
- A sticky device error (an illegal address, a device-side assert, a lost GPU): every later
  CUDA call in the process fails too, so the engine stops taking work and says so on /readyz
  instead of failing batch after batch while it looks healthy.
- Anything else fails only the requests of that batch.
"""

from __future__ import annotations

import torch


def out_of_memory_type() -> type[Exception]:
    """torch.OutOfMemoryError where it exists (any device), else the CUDA one it generalised."""
    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


OutOfMemoryError = out_of_memory_type()

# CUDA's sticky errors, as their messages read: after one, the CUDA context is unusable
# (CUDA runtime API, "cudaError": 700, 702, 710, 714-719, 214, 999).
STICKY_DEVICE_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "launch timed out",
    "illegal instruction",
    "misaligned address",
    "hardware stack error",
    "invalid program counter",
    "not supported on global/shared address space",
    "uncorrectable ecc error",
    "cuda error: unknown error",
    "unrecoverable",
)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, OutOfMemoryError)


def device_is_broken(error: BaseException, device: torch.device) -> bool:
    """True when `error` (raised by work on `device`) left the device unusable: its message is a
    sticky CUDA error, or the device fails a trivial operation now. A CPU never breaks this way."""
    message = str(error).lower()
    if any(sticky in message for sticky in STICKY_DEVICE_ERRORS):
        return True
    return device.type == "cuda" and not device_answers(device)


def device_answers(device: torch.device) -> bool:
    """Whether `device` still runs a trivial kernel and syncs (only after a failure: it waits)."""
    try:
        torch.ones(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
    except Exception:
        return False
    return True
