"""Latency under load: continuous vs static vs sequential batching, Poisson arrivals.

    python -m bench.engine_latency                     # loads 0.5 0.8 0.95, all three policies
    python -m bench.engine_latency --requests 200 --ddpm-steps 1000 --ddim-steps 50   # the paper's step counts

One-image requests arrive as a Poisson process, half 'ddpm' (--ddpm-steps) and half 'ddim'
(--ddim-steps): by default 200 and 10, the paper's 1000 and 50 scaled down by 5 so a run
takes minutes on a CPU. The load is a fraction of the saturation rate of continuous
batching, max_batch / (mean steps x seconds per U-Net call at max_batch), measured first
on the bare U-Net. Every policy sees the same arrivals and the same request mix.
Latency is from submit to Done; throughput is requests / (last Done - first submit).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import time

import numpy as np
import torch

from bench.engine_throughput import bare_loop, in_own_thread, load_model
from server.contract import POLICIES, EngineConfig, GenerationSpec, validate
from server.engine import Engine

Arrival = tuple[float, GenerationSpec]  # (seconds after the start, request)


class BatchSizes:
    """An EngineObserver that only records batch sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_step(self, batch_size: int, step_s: float, running_lanes: int, queue_depth: int) -> None:
        self.sizes.append(batch_size)

    def __getattr__(self, name: str):
        return lambda *args: None


def poisson_arrivals(count: int, rate: float, ddpm_steps: int, ddim_steps: int, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    arrivals, clock = [], 0.0
    for index in range(count):
        clock += rng.expovariate(rate)
        if rng.random() < 0.5:
            spec = GenerationSpec(n=1, steps=ddpm_steps, sampler="ddpm", seed=index)
        else:
            spec = GenerationSpec(n=1, steps=ddim_steps, sampler="ddim", seed=index)
        arrivals.append((clock, spec))
    return arrivals


async def serve(ddpm, config: EngineConfig, arrivals: list[Arrival]) -> dict[str, float]:
    observer = BatchSizes()
    engine = Engine(ddpm, config, observer)
    await engine.start()
    try:
        await engine.submit(validate(GenerationSpec(n=1, steps=1), engine.limits)).result()  # warm-up
        observer.sizes.clear()
        began = time.perf_counter()

        async def one(offset: float, spec: GenerationSpec) -> tuple[float, float]:
            await asyncio.sleep(max(0.0, began + offset - time.perf_counter()))
            submitted = time.perf_counter()
            await engine.submit(validate(spec, engine.limits)).result()
            finished = time.perf_counter()
            return finished - submitted, finished

        results = await asyncio.gather(*(one(offset, spec) for offset, spec in arrivals))
    finally:
        await engine.shutdown()
    latencies = np.array([latency for latency, _ in results])
    elapsed = max(finished for _, finished in results) - began
    return {
        "throughput": len(arrivals) / elapsed,
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "mean_batch": float(np.mean(observer.sizes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--loads", nargs="+", type=float, default=[0.5, 0.8, 0.95])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--requests", type=int, default=100, help="arrivals per run")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--ddpm-steps", type=int, default=200)
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # as ddpm-serve does: only the stepping thread runs an OpenMP team

    ddpm = load_model(args.model)
    calls = 20
    step_s = in_own_thread(threads, bare_loop, ddpm, args.max_batch, calls).wall_s / calls
    mean_steps = (args.ddpm_steps + args.ddim_steps) / 2
    saturation = args.max_batch / (mean_steps * step_s)
    print(f"torch {torch.__version__}, {threads} threads; {args.model}, max_batch {args.max_batch}: "
          f"{1000 * step_s:.1f} ms per U-Net call, saturation {saturation:.2f} requests/s "
          f"(ddpm {args.ddpm_steps} / ddim {args.ddim_steps} steps, 50/50)")
    print(f"{'load':>5} {'policy':11} {'req/s':>7} {'p50 s':>8} {'p99 s':>8} {'batch':>6}")
    config = EngineConfig(max_batch=args.max_batch, max_queue=max(args.requests, 64), torch_threads=threads)
    for load in args.loads:
        arrivals = poisson_arrivals(args.requests, load * saturation, args.ddpm_steps, args.ddim_steps, args.seed)
        for policy in args.policies:
            figures = asyncio.run(serve(ddpm, dataclasses.replace(config, policy=policy), arrivals))
            print(f"{load:5.2f} {policy:11} {figures['throughput']:7.2f} {figures['p50']:8.2f} "
                  f"{figures['p99']:8.2f} {figures['mean_batch']:6.1f}", flush=True)


if __name__ == "__main__":
    main()
