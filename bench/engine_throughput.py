"""Images per second at saturation: the engine against the bare U-Net loop at the same batch size.

    python -m bench.engine_throughput                       # mnist and cifar10 configs, batch caps 1 8 32
    python -m bench.engine_throughput --models mnist --batches 8 32 --steps 50 --threads 1
    python -m bench.engine_throughput --models mnist --sampler unipc     # lanes that carry history

The engine gets rounds x batch one-image requests at once (--sampler, by default respaced DDPM,
--steps steps), so every U-Net call is full; the bare loop calls the U-Net `rounds x steps` times on a batch of
the same size and does nothing else. Their ratio is what the engine costs: admission,
per-image noise, the sampler update, events and PNG encoding. Each figure is the best of
--repeats runs, bare and engine interleaved, because a shared CPU makes single runs noisy.
Both wall-clock and CPU time (all the process's threads) are reported: on a CPU shared with
other work, wall-clock figures mostly measure the neighbours, CPU time measures the engine.
Random weights unless weights/ddpm-mnist.safetensors exists: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import model
from model.samplers import SAMPLERS
from server.contract import EngineConfig, GenerationSpec, validate
from server.engine import Engine

SHIPPED_WEIGHTS = Path("weights/ddpm-mnist.safetensors")


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float  # CPU time of the whole process, every thread

    @classmethod
    def since(cls, wall_began: float, cpu_began: float) -> "Timing":
        return cls(time.perf_counter() - wall_began, time.process_time() - cpu_began)


def load_model(name: str) -> model.DDPM:
    """The shipped weights for mnist when present, else the preset with random weights."""
    if name == "mnist" and SHIPPED_WEIGHTS.exists():
        return model.load(SHIPPED_WEIGHTS)
    config = model.preset(name)
    return model.DDPM(model.UNet(config.unet), config).prepare_for_inference()  # as model.load does


@torch.inference_mode()
def bare_loop(ddpm: model.DDPM, batch: int, calls: int) -> Timing:
    """`calls` U-Net forwards on a batch of `batch`, nothing else."""
    x = torch.randn(batch, *ddpm.image_shape)
    t = torch.randint(0, ddpm.diffusion.num_timesteps, (batch,))
    ddpm.unet(x, t)  # warm-up
    wall_began, cpu_began = time.perf_counter(), time.process_time()
    for _ in range(calls):
        ddpm.unet(x, t)
    return Timing.since(wall_began, cpu_began)


def in_own_thread(threads: int, fn, *args):
    """fn(*args) in a fresh thread with `threads` torch threads: where the engine runs its steps,
    so both sides get the same OpenMP set-up (see server.app.reserve_cores_for_engine)."""
    result = []

    def run() -> None:
        torch.set_num_threads(threads)
        result.append(fn(*args))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


async def engine_run(ddpm: model.DDPM, batch: int, rounds: int, steps: int, threads: int, sampler: str) -> Timing:
    """Time for the engine to serve rounds x batch one-image requests submitted at once."""
    images = batch * rounds
    config = EngineConfig(max_batch=batch, max_queue=max(images, 64), max_images_per_request=batch,
                          torch_threads=threads)
    engine = Engine(ddpm, config)
    await engine.start()
    try:
        # The first call at a batch size sets up its kernels, as the bare loop's warm-up does.
        await engine.submit(validate(GenerationSpec(n=batch, steps=1), engine.limits)).result()
        wall_began, cpu_began = time.perf_counter(), time.process_time()
        specs = [validate(GenerationSpec(n=1, steps=steps, sampler=sampler, seed=i), engine.limits)
                 for i in range(images)]
        handles = [engine.submit(spec) for spec in specs]
        for handle in handles:
            await handle.result()
        return Timing.since(wall_began, cpu_began)
    finally:
        await engine.shutdown()


def measure(ddpm: model.DDPM, batch: int, rounds: int, steps: int, repeats: int, threads: int,
            sampler: str) -> dict[str, float]:
    """Best-of-repeats images/s, by wall clock and by CPU time, for the bare loop and the engine."""
    bare, served = [], []
    for _ in range(repeats):
        bare.append(in_own_thread(threads, bare_loop, ddpm, batch, rounds * steps))
        served.append(asyncio.run(engine_run(ddpm, batch, rounds, steps, threads, sampler)))
    images = batch * rounds
    return {
        "bare_wall": images / min(t.wall_s for t in bare),
        "engine_wall": images / min(t.wall_s for t in served),
        "bare_cpu": images / min(t.cpu_s for t in bare),
        "engine_cpu": images / min(t.cpu_s for t in served),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mnist", "cifar10"], choices=sorted(model.PRESETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per image (mnist)")
    parser.add_argument("--cifar-steps", type=int, default=2, help="steps per image for the big configs")
    parser.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS), help="every request's sampler")
    parser.add_argument("--rounds", type=int, default=1, help="full batches per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # as ddpm-serve does: only the stepping thread runs an OpenMP team

    print(f"torch {torch.__version__}, {threads} threads, device cpu, sampler {args.sampler}", flush=True)
    print("images/s by wall clock | by CPU time; ratio = engine / bare; ms/step = engine CPU ms per U-Net call")
    print(f"{'model':8} {'batch':>5} {'steps':>5} | {'bare':>8} {'engine':>8} {'ratio':>6} | "
          f"{'bare':>8} {'engine':>8} {'ratio':>6} {'ms/step':>8}")
    for name in args.models:
        ddpm = load_model(name)
        steps = args.steps if name == "mnist" else args.cifar_steps
        for batch in args.batches:
            f = measure(ddpm, batch, args.rounds, steps, args.repeats, threads, args.sampler)
            step_ms = 1000 * batch / (f["engine_cpu"] * steps)
            print(f"{name:8} {batch:5d} {steps:5d} | {f['bare_wall']:8.2f} {f['engine_wall']:8.2f} "
                  f"{f['engine_wall'] / f['bare_wall']:6.3f} | {f['bare_cpu']:8.2f} {f['engine_cpu']:8.2f} "
                  f"{f['engine_cpu'] / f['bare_cpu']:6.3f} {step_ms:8.1f}", flush=True)


if __name__ == "__main__":
    main()
