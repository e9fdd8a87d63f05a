"""The cost of image-to-image lanes beside plain ones, per U-Net call.

    python -m bench.img2img                       # shipped mnist model, batch 16, 50 ddpm steps
    python -m bench.img2img --batch 32 --steps 100 --repeats 3

Runs the same engine with a full batch of plain lanes, then the same batch half plain and half
inpainting (which adds no U-Net call: its known pixels are re-encoded after every step), and a
variation at strength 0.5 (which runs half the steps; also with dpmpp_2m, whose lanes start at
first order), and inpainting with RePaint's resampling (about 3x the calls, plus a noising per
jump). Prints seconds per U-Net call for each
mix, so the extra cost of a lane kind shows as the ratio to plain; the goal is no more cost than
the U-Net calls a kind adds. Alternating repeats in one process; read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
import torch

from bench.engine_throughput import in_own_thread, load_model
from server.contract import EngineConfig, GenerationSpec, validate
from server.contract.sources import Picture, Source
from server.engine import Engine


def digit(shape: tuple[int, int, int]) -> Picture:
    c, h, w = shape
    pixels = np.zeros(shape, dtype=np.uint8)
    pixels[:, h // 5: 4 * h // 5, 2 * w // 5: 3 * w // 5] = 230
    return Picture(pixels.tobytes(), shape)


def mixes(shape: tuple[int, int, int], batch: int, steps: int) -> dict[str, list[GenerationSpec]]:
    keep = np.ones(shape[1:], dtype=np.uint8)
    keep[: shape[1] // 2] = 0
    inpaint = Source("inpaint", digit(shape), keep=keep.tobytes())
    half = batch // 2
    return {
        "plain": [GenerationSpec(n=batch, steps=steps, seed=1)],
        "half inpaint": [GenerationSpec(n=half, steps=steps, seed=1),
                         GenerationSpec(n=batch - half, steps=steps, seed=2, source=inpaint)],
        "all inpaint": [GenerationSpec(n=batch, steps=steps, seed=2, source=inpaint)],
        "variation 0.5": [GenerationSpec(n=batch, steps=steps, seed=3, source=Source("variation", digit(shape), 0.5))],
        "variation 0.5 dpmpp_2m": [GenerationSpec(n=batch, steps=steps, sampler="dpmpp_2m", seed=3,
                                                  source=Source("variation", digit(shape), 0.5))],
        "inpaint, RePaint j=5 r=3": [GenerationSpec(n=batch, steps=steps, seed=2,
                                                    source=Source("inpaint", digit(shape), keep=keep.tobytes(),
                                                                  jump_length=5, jump_n_sample=3))],
    }


async def seconds_per_call(ddpm, specs: list[GenerationSpec], batch: int) -> float:
    calls = []
    observer = type("Calls", (), {"on_step": lambda self, size, step_s, *rest: calls.append(size),
                                  "__getattr__": lambda self, name: (lambda *args: None)})()
    engine = Engine(ddpm, EngineConfig(max_batch=batch, max_images_per_request=batch), observer)
    await engine.start()
    try:
        calls.clear()  # the warm-up's
        started = time.perf_counter()
        handles = [engine.submit(validate(spec, engine.model_info().limits)) for spec in specs]
        for handle in handles:
            await handle.result()
        return (time.perf_counter() - started) / len(calls)
    finally:
        await engine.shutdown(grace_s=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ddpm = load_model(args.model)
    runs = mixes(ddpm.image_shape, args.batch, args.steps)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, specs in runs.items():
            times[name].append(in_own_thread(args.threads, asyncio.run, seconds_per_call(ddpm, specs, args.batch)))
    plain = statistics.median(times["plain"])
    print(f"{args.model}, batch {args.batch}, {args.steps} ddpm steps, {args.threads} thread(s), "
          f"median of {args.repeats}; torch {torch.__version__}")
    print(f"{'mix':<26}{'ms per U-Net call':>20}{'vs plain':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<26}{median * 1e3:>20.1f}{median / plain:>10.3f}")


if __name__ == "__main__":
    main()
