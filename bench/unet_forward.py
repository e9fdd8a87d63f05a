"""Time one U-Net forward: ours (prepared for inference) against diffusers' UNet2DModel.

    nice -n 10 .venv/bin/python bench/unet_forward.py                # batch 1, 8, 32; then MNIST
    .venv/bin/python bench/unet_forward.py --batches 8 --rounds 5     # one batch size, more rounds

Both models hold the same weights (the CIFAR-10 architecture of google/ddpm-cifar10-32, every
diffusers field set explicitly) and see the same input. diffusers runs as its DDPMPipeline runs
it (eval, torch.no_grad, default layout); ours runs as model.load and the serving engine run it
(prepare_for_inference, torch.inference_mode). A CPU shared with other work drifts 10-30% in
speed from one minute to the next, so each round times the two back to back, in alternating
order, and the figure that counts is the median of the per-round ratios.

The shipped MNIST preset is then timed the same way: ours prepared against ours plain.

With --dtype bfloat16 (or float16), each model instead times ours prepared in float32 against
ours prepared in that dtype, same weights (as model.load(..., dtype=...) runs it):

    nice -n 10 .venv/bin/python bench/unet_forward.py --dtype bfloat16 --batches 32
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch

import model
from model.checkpoint import load_state
from model.inference import prepare_for_inference
from model.precision import DTYPES

# The FLOPs of one CIFAR-10 U-Net forward per image (multiply-adds count as 2).
GFLOP_PER_IMAGE = 12.44

# google/ddpm-cifar10-32's unet/config.json, with every field the constructor would otherwise
# default (differently) written out.
DIFFUSERS_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=1,
    flip_sin_to_cos=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=0,
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cifar10_pair(seed: int) -> tuple[Forward, Forward]:
    """(diffusers, ours) forwards over the same random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    reference = UNet2DModel(**DIFFUSERS_CIFAR10).eval()
    ours = model.UNet(model.preset("cifar10").unet)
    load_state(ours, reference.state_dict(), "diffusers UNet2DModel")
    prepare_for_inference(ours, num_timesteps=1000)

    @torch.no_grad()
    def diffusers_forward(x, t):
        return reference(x, t).sample

    @torch.inference_mode()
    def our_forward(x, t):
        return ours(x, t)

    return diffusers_forward, our_forward


def mnist_pair(seed: int) -> tuple[Forward, Forward]:
    """(plain, prepared) forwards of the shipped MNIST architecture."""
    torch.manual_seed(seed)
    config = model.preset("mnist")
    plain = model.UNet(config.unet).eval()
    prepared = prepare_for_inference(copy.deepcopy(plain), config.diffusion.num_timesteps)

    @torch.no_grad()
    def plain_forward(x, t):
        return plain(x, t)

    @torch.inference_mode()
    def prepared_forward(x, t):
        return prepared(x, t)

    return plain_forward, prepared_forward


def with_nonzero_weights(unet: torch.nn.Module) -> torch.nn.Module:
    """`unet` with every weight drawn from N(0, 0.02): its zero-initialised output layers would
    make every output 0, and two U-Nets compared on zeros agree whatever they compute."""
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0.0, 0.02)
    return unet


def dtype_pair(config: model.ModelConfig, dtype: torch.dtype, seed: int) -> tuple[Forward, Forward]:
    """(float32, dtype) forwards of our prepared U-Net, over the same random (non-zero) weights."""
    torch.manual_seed(seed)
    float32 = with_nonzero_weights(model.UNet(config.unet))
    reduced = copy.deepcopy(float32).to(dtype)
    prepare_for_inference(float32, config.diffusion.num_timesteps)
    prepare_for_inference(reduced, config.diffusion.num_timesteps)

    @torch.inference_mode()
    def float32_forward(x, t):
        return float32(x, t)

    @torch.inference_mode()
    def reduced_forward(x, t):
        return reduced(x, t)

    return float32_forward, reduced_forward


def seconds_per_call(forward: Forward, x: torch.Tensor, t: torch.Tensor, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        forward(x, t)
    return (time.perf_counter() - start) / reps


def paired_times(baseline: Forward, candidate: Forward, x, t, rounds: int, reps: int):
    """Per-round (baseline, candidate) seconds per forward, alternating which goes first."""
    baseline(x, t), candidate(x, t)  # warm-up: first-call allocations and oneDNN primitive caches
    times = []
    for r in range(rounds):
        order = (baseline, candidate) if r % 2 == 0 else (candidate, baseline)
        measured = {f: seconds_per_call(f, x, t, reps) for f in order}
        times.append((measured[baseline], measured[candidate]))
    return times


def report(label: str, names: tuple[str, str], batch: int, times, gflop_per_image: float | None) -> None:
    ratios = [b / c for b, c in times]
    line = f"{label} batch {batch:2d}: {names[1]}/{names[0]} speed ratio {statistics.median(ratios):.2f}x"
    line += f" (rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    for i, name in enumerate(names):
        median_s = statistics.median(pair[i] for pair in times)
        line += f" | {name} {median_s * 1e3:.1f} ms {batch / median_s:.1f} img/s"
        if gflop_per_image:
            line += f" {gflop_per_image * batch / median_s:.0f} GFLOP/s"
    print(line, flush=True)


def time_batches(label: str, names: tuple[str, str], baseline: Forward, candidate: Forward,
                 config: model.ModelConfig, args: argparse.Namespace, reps_factor: int = 1,
                 gflop_per_image: float | None = None, show_difference: bool = False) -> None:
    """One report line per batch size in args.batches: baseline against candidate on random
    inputs of `config`'s shape, max(reps_factor, reps_factor * args.images_per_round // batch)
    forwards per round (a cheap U-Net takes a larger factor, so that each timing stays well above
    the timer's resolution). With show_difference, the label gives the two outputs' max relative
    difference on that batch too."""
    unet = config.unet
    for batch in args.batches:
        x = torch.randn(batch, unet.in_channels, unet.image_size, unet.image_size)
        t = torch.randint(0, config.diffusion.num_timesteps, (batch,))
        batch_label = label
        if show_difference:
            batch_label += f" (max relative diff {relative_difference(baseline, candidate, x, t):.1e})"
        times = paired_times(baseline, candidate, x, t, args.rounds,
                             max(reps_factor, reps_factor * args.images_per_round // batch))
        report(batch_label, names, batch, times, gflop_per_image)


def relative_difference(reference: Forward, candidate: Forward, x, t) -> float:
    expected = reference(x, t)
    return ((expected - candidate(x, t)).abs().max() / expected.abs().max()).item()


def time_dtypes(args: argparse.Namespace) -> None:
    """Ours in float32 against ours in args.dtype, for each model not skipped."""
    presets = [name for name, skip in (("cifar10", args.skip_cifar10), ("mnist", args.skip_mnist)) if not skip]
    for name in presets:
        config = model.preset(name)
        float32_forward, reduced_forward = dtype_pair(config, DTYPES[args.dtype], args.seed)
        shape = (config.unet.in_channels, config.unet.image_size, config.unet.image_size)
        x, t = torch.randn(2, *shape), torch.tensor([0, config.diffusion.num_timesteps - 1])
        print(f"{name} U-Net: max |float32 - {args.dtype}| / max |float32| on one batch: "
              f"{relative_difference(float32_forward, reduced_forward, x, t):.1e}")
        time_batches(name, ("float32", args.dtype), float32_forward, reduced_forward, config, args,
                     gflop_per_image=GFLOP_PER_IMAGE if name == "cifar10" else None)


def check_same_function(reference: Forward, ours: Forward, x, t) -> None:
    diff = (reference(x, t) - ours(x, t)).abs().max().item()
    print(f"max |diffusers - ours| on one batch: {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the two models disagree: the timings would not compare the same function")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3, help="paired rounds per batch size")
    p.add_argument("--images-per-round", type=int, default=8,
                   help="forwards per round per model = max(1, this // batch)")
    p.add_argument("--skip-cifar10", action="store_true")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="other than float32: time ours in float32 against ours in this dtype instead")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if args.dtype != "float32":
        return time_dtypes(args)

    if not args.skip_cifar10:
        diffusers_forward, our_forward = cifar10_pair(args.seed)
        x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 999])
        check_same_function(diffusers_forward, our_forward, x, t)
        print(f"CIFAR-10 U-Net (35.7M parameters, {GFLOP_PER_IMAGE} GFLOP per image per step)")
        time_batches("cifar10", ("diffusers", "ours"), diffusers_forward, our_forward, model.preset("cifar10"), args,
                     gflop_per_image=GFLOP_PER_IMAGE)

    if not args.skip_mnist:
        plain_forward, prepared_forward = mnist_pair(args.seed)
        print("MNIST preset U-Net (the shipped model): ours prepared vs ours plain (eval, no_grad)")
        time_batches("mnist", ("plain", "prepared"), plain_forward, prepared_forward, model.preset("mnist"), args,
                     reps_factor=4)


if __name__ == "__main__":
    main()
