"""Training steps/s by torch thread count: on an idle CPU and beside a busy process, with
OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE.

    python -m bench.threads                          # mnist preset, batch 64, threads 1 and 2
    python -m bench.threads --threads 1 2 4 --rounds 5 --steps 10
    python -m bench.threads --threads 2 --envs default OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000

Each case runs in a fresh child process with its environment (--envs: "default" is OpenMP's
own settings; the wait policy is read when torch loads, so it cannot change in-process): the
child builds the trainer on random images, runs --warmup steps, then times --steps steps of
Trainer.train_step with torch.set_num_threads(N). 'busy' runs `python -c "while True: pass"`
beside the child for its whole life (another job on a shared machine). Rounds repeat every
case, the order reversed every other round, so a drifting machine slows all cases alike; the
table gives the median over rounds. The load average before each round shows how idle "idle" was.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUSY = [sys.executable, "-c", "while True: pass"]


def child(args: argparse.Namespace) -> None:
    import torch  # first: model.train would otherwise set OMP_WAIT_POLICY before torch loads

    from bench.train_step import steps_per_second, trainer_step

    torch.set_num_threads(args.child)
    with tempfile.TemporaryDirectory() as out:
        step = trainer_step(args.preset, args.batch_size, "cpu", out)
        for _ in range(args.warmup):
            step()
        print(steps_per_second(step, args.steps, "cpu"))


def run_case(threads: int, busy: bool, setting: str, args: argparse.Namespace) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    if setting != "default":
        env.update(item.split("=", 1) for item in setting.split(","))
    command = [sys.executable, "-m", "bench.threads", "--child", str(threads), "--preset", args.preset,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    hog = subprocess.Popen(BUSY) if busy else None
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return float(done.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--envs", nargs="+", default=["default", "OMP_WAIT_POLICY=PASSIVE"],
                   help="OpenMP settings to compare: 'default' or VAR=VALUE[,VAR=VALUE]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return

    cases = list(itertools.product(args.envs, [False, True], args.threads))  # (setting, busy, threads)
    rates: dict[tuple, list[float]] = {case: [] for case in cases}
    print(f"{os.cpu_count()} CPUs; {args.preset} preset, batch {args.batch_size}, {args.steps} timed steps per case, "
          f"{args.rounds} rounds", flush=True)
    for round_index in range(args.rounds):
        order = cases if round_index % 2 == 0 else cases[::-1]
        print(f"round {round_index + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for setting, busy, threads in order:
            rate = run_case(threads, busy, setting, args)
            rates[(setting, busy, threads)].append(rate)
            print(f"  {setting} {'busy' if busy else 'idle'} {threads} threads: {rate:.3f} steps/s", flush=True)

    width = max(map(len, args.envs))
    print("\nsteps/s, median over rounds (OpenMP settings, CPU, threads):")
    for setting, busy, threads in cases:
        values = rates[(setting, busy, threads)]
        print(f"  {setting:{width}s} {'busy' if busy else 'idle'} {threads} threads: "
              f"{statistics.median(values):.3f}  ({' '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
