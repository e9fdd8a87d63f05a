"""Training steps/s: our Trainer.train_step against a plain PyTorch loop of the same model.

    python -m bench.train_step                    # cifar10 preset at batch 8, mnist preset at batch 64
    python -m bench.train_step --presets mnist --blocks 6 --steps 10 --device cuda

The plain loop is the floor: L_simple, backward, Adam step. The trainer adds what the recipe
needs: per-step seeding, the batch lookup, lr warmup, gradient clipping and the EMA update.
The two alternate in blocks (the order flipping every block) so that a busy machine slows
both alike; the figures are medians over blocks. Random images stand in for the dataset.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

from model.config import preset
from model.diffusion import GaussianDiffusion
from model.train import Trainer, parse_args
from model.unet import UNet

DEFAULT_BATCH = {"cifar10": 8, "mnist": 64}


def trainer_step(name: str, batch_size: int, device: str, out: str) -> Callable[[], None]:
    args = parse_args(["--preset", name, "--batch-size", str(batch_size), "--device", device, "--out", out])
    c, size = preset(name).unet.in_channels, preset(name).unet.image_size
    images = torch.randint(0, 256, (16 * batch_size, c, size, size), dtype=torch.uint8)
    trainer = Trainer(args, images)
    trainer.state.model.train()

    def step() -> None:
        trainer.train_step(trainer.state.step)
        trainer.state.step += 1

    return step


def plain_step(name: str, batch_size: int, device: str) -> Callable[[], None]:
    config = preset(name)
    torch.manual_seed(0)
    unet = UNet(config.unet).to(device).train()
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion(config.diffusion)
    u = config.unet
    x0 = torch.rand(batch_size, u.in_channels, u.image_size, u.image_size, device=device) * 2 - 1

    def step() -> None:
        loss = diffusion.training_loss(unet, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def steps_per_second(step: Callable[[], None], steps: int, device: str) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


def compare(name: str, batch_size: int, device: str, blocks: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        loops = {"trainer": trainer_step(name, batch_size, device, out), "plain": plain_step(name, batch_size, device)}
        for step in loops.values():
            step()  # warm-up: allocator, first-call costs
        rates: dict[str, list[float]] = {key: [] for key in loops}
        for block in range(blocks):
            order = list(loops) if block % 2 == 0 else list(reversed(loops))
            for key in order:
                rates[key].append(steps_per_second(loops[key], steps, device))
    trainer, plain = statistics.median(rates["trainer"]), statistics.median(rates["plain"])
    return {"preset": name, "batch_size": batch_size, "trainer": trainer, "plain": plain,
            "overhead_pct": 100 * (plain / trainer - 1), "blocks": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_BATCH), choices=["cifar10", "lsun256", "mnist", "tiny"])
    p.add_argument("--batch-size", type=int, default=None, help="default: cifar10 8, mnist 64")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="steps per block")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.blocks} blocks x {args.steps} steps each")
    for name in args.presets:
        batch = args.batch_size or DEFAULT_BATCH.get(name, 16)
        r = compare(name, batch, args.device, args.blocks, args.steps)
        blocks = " ".join(f"{t:.2f}/{p:.2f}" for t, p in zip(r["blocks"]["trainer"], r["blocks"]["plain"], strict=True))
        print(f"{name:8s} batch {batch:4d}: trainer {r['trainer']:.3f} steps/s, plain {r['plain']:.3f} steps/s, "
              f"overhead {r['overhead_pct']:+.1f}%  (per block trainer/plain: {blocks})")


if __name__ == "__main__":
    main()
