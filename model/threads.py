"""CPU threads for ddpm-train and ddpm-eval: --threads, and the OpenMP wait policy.

torch's CPU kernels run on an OpenMP team whose idle threads, by default, spin at every barrier.
Beside another busy process a spinning thread takes the core that the thread with the work
needs. Measured on the project's 2-core VM (bench/threads.py, mnist preset, batch 64): 2 spinning
threads trained at 0.08-0.13 steps/s beside a busy process against 0.19-0.35 for 1 thread; with
OMP_WAIT_POLICY=PASSIVE (idle threads sleep) 2 threads ran at 0.22-0.45, on par with 1 thread,
idle or busy. Spinning pays only on a quiet machine (2 threads: up to 0.63 steps/s), so the CLIs
let idle threads sleep unless told otherwise: the policy is read once, when torch loads, so they
call `sleep_idle_threads()` before they import torch, and keep a value already in the environment
(OMP_WAIT_POLICY=ACTIVE brings spinning back on a machine of your own).
"""

from __future__ import annotations

import argparse
import os


def sleep_idle_threads() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def thread_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=thread_count, default=0,
                        help="torch CPU threads (default 0: torch's default, one per core, or $OMP_NUM_THREADS)")


def set_threads(threads: int) -> int:
    """--threads: 0 keeps torch's default. Returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
