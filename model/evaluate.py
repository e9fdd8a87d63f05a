"""ddpm-eval: measure a trained DDPM (our .safetensors file, a training checkpoint's EMA
weights, or a diffusers folder).

    ddpm-eval nll     --weights W --data mnist --limit 100     # bits/dim, test split
    ddpm-eval samples --weights W --sampler ddpm --steps 1000 -n 64 --out grid.png
    ddpm-eval speed   --weights W --sampler ddim --steps 50 --batch-size 64
    ddpm-eval fid     --weights W --inception inception-2015-12-05.pt --num-samples 10000
    ddpm-eval score   --weights W --sampler ddim --steps 100 -n 256    # MNIST-like models, no download

Every command prints its figures; --json FILE also writes them as JSON. Progress bars go to
stderr (--progress / --no-progress; default: on when stderr is a terminal).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from .threads import add_threads_argument, set_threads, sleep_idle_threads

sleep_idle_threads()  # before torch loads, which reads it once (model.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .checkpoint import CheckpointError  # noqa: E402
from .data import DatasetError, dataset_path, load_dataset, save_grid, to_model_range, to_uint8  # noqa: E402
from .download import add_data_arguments, resolve_data_path  # noqa: E402
from .fid import INCEPTION_URL, InceptionError, feature_statistics, frechet_distance, inception_features, load_inception  # noqa: E402
from .pipeline import DDPM, load  # noqa: E402
from .precision import DTYPE_CHOICES, dtype_name  # noqa: E402
from .quality import CACHE_ENV, CONFIDENCE, IMAGE_SHAPE, load_or_train_scorer  # noqa: E402
from .samplers import SAMPLERS, image_generator  # noqa: E402

DEFAULT_WEIGHTS = "weights/ddpm-mnist.safetensors"


class EvalError(ValueError):
    """Options that do not fit the model; the message says which."""


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr; at most one line per 10 s where stderr is a file or a pipe (logs)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)


# -- negative log-likelihood --------------------------------------------------------------
@torch.inference_mode()
def negative_log_likelihood(ddpm: DDPM, images: torch.Tensor, batch_size: int = 64, t_chunk: int = 4,
                            seed: int = 0, progress: bool = True) -> dict:
    """The variational bound on -log p(x) in bits/dim (Ho et al. 2020, eq. 5) over uint8 images [N, C, H, W]:
    prior L_T + sum of KL terms L_1..L_{T-1} + discretized decoder L_0, averaged over images."""
    ddpm.unet.eval()
    prior, decoder, kl = [], [], []
    with progress_bar(len(images), "nll", "img", progress) as bar:
        for start in range(0, len(images), batch_size):
            x0 = to_model_range(images[start : start + batch_size]).to(ddpm.device)
            generators = [image_generator(seed, start + i, ddpm.device) for i in range(x0.shape[0])]
            _, terms = ddpm.diffusion.bits_per_dim(ddpm.unet, x0, generators, t_chunk)
            prior.append(ddpm.diffusion.prior_bpd(x0))
            decoder.append(terms[:, 0])
            kl.append(terms[:, 1:].sum(dim=1))
            bar.update(x0.shape[0])
    prior, decoder, kl = torch.cat(prior).double(), torch.cat(decoder).double(), torch.cat(kl).double()
    total = prior + decoder + kl
    stderr = total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")
    return {"bits_per_dim": total.mean().item(), "stderr": stderr, "prior_L_T": prior.mean().item(),
            "decoder_L_0": decoder.mean().item(), "kl_sum": kl.mean().item(), "num_images": len(total)}


# -- samples, speed, FID ------------------------------------------------------------------
def sample_images(ddpm: DDPM, n: int, batch_size: int, sampler: str, steps: int, eta: float, seed: int,
                  progress: bool = True) -> torch.Tensor:
    """n uint8 images: ddpm.sample(n, seed=seed) computed in batches (image j seeded by image_seed(seed, j))."""
    batches = []
    with progress_bar(math.ceil(n / batch_size) * steps, "sample", "step", progress) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            images = ddpm.sample(count, steps=steps, sampler=sampler, eta=eta, seed=seed, first_index=start,
                                 on_step=bar.update)
            batches.append(to_uint8(images).cpu())
            bar.set_postfix(images=start + count)
    return torch.cat(batches)


def sampling_speed(ddpm: DDPM, sampler: str, steps: int, batch_size: int, repeats: int, eta: float = 0.0,
                   progress: bool = True) -> dict:
    """Images per second of whole sampling runs (one warm-up call first, not timed)."""
    def timed_run(run_steps: int, seed: int, bar: tqdm) -> float:
        started = time.perf_counter()
        ddpm.sample(batch_size, steps=run_steps, sampler=sampler, eta=eta, seed=seed, on_step=bar.update)
        if ddpm.device.type == "cuda":
            torch.cuda.synchronize(ddpm.device)
        return time.perf_counter() - started

    with progress_bar(1 + repeats * steps, "speed", "step", progress) as bar:
        timed_run(1, 0, bar)
        seconds = [timed_run(steps, r, bar) for r in range(repeats)]
    median = statistics.median(seconds)
    return {"sampler": sampler, "steps": steps, "batch_size": batch_size, "repeats": repeats,
            "images_per_s": batch_size / median, "seconds_per_batch": median,
            "ms_per_step": 1000 * median / steps, "device": str(ddpm.device)}


def reference_statistics(args: argparse.Namespace, ddpm: DDPM, detector) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of the reference images, read from / written to --ref-stats when given."""
    cache = Path(args.ref_stats) if args.ref_stats else None
    if cache and cache.is_file():
        with np.load(cache) as stats:
            return stats["mu"], stats["sigma"]
    c, size, _ = ddpm.image_shape
    data = dataset_name(args, ddpm)
    images = load_dataset(data, args.split, resolve_data_path(args, data), size, c, args.num_reference)
    mu, sigma = feature_statistics(inception_features(detector, images, ddpm.device, args.inception_batch))
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, mu=mu, sigma=sigma)
    return mu, sigma


# -- commands -----------------------------------------------------------------------------
def dataset_name(args: argparse.Namespace, ddpm: DDPM) -> str:
    return args.data or ("mnist" if ddpm.image_shape[0] == 1 else "cifar10")


def check_steps(ddpm: DDPM, steps: int | None) -> int:
    num_timesteps = ddpm.diffusion.num_timesteps
    steps = steps or num_timesteps
    if not 1 <= steps <= num_timesteps:
        raise EvalError(f"--steps must be between 1 and {num_timesteps} for this model, got {steps}")
    return steps


def run_nll(args: argparse.Namespace, ddpm: DDPM) -> dict:
    c, size, _ = ddpm.image_shape
    data = dataset_name(args, ddpm)
    images = load_dataset(data, args.split, resolve_data_path(args, data), size, c, args.limit)
    result = negative_log_likelihood(ddpm, images, args.batch_size, args.t_chunk, args.seed, args.progress)
    print(f"NLL {result['bits_per_dim']:.4f} +- {result['stderr']:.4f} bits/dim "
          f"({data} {args.split}, {result['num_images']} images, T={ddpm.diffusion.num_timesteps})")
    print(f"  prior L_T            {result['prior_L_T']:.5f}")
    print(f"  decoder L_0          {result['decoder_L_0']:.5f}")
    print(f"  sum of KL L_1..L_T-1 {result['kl_sum']:.5f}")
    return {**result, "dataset": data, "split": args.split, "seed": args.seed}


def run_samples(args: argparse.Namespace, ddpm: DDPM) -> dict:
    steps = check_steps(ddpm, args.steps)
    started = time.perf_counter()
    with progress_bar(steps, "samples", "step", args.progress) as bar:
        images = ddpm.sample(args.num, steps=steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                             on_step=bar.update)
    seconds = time.perf_counter() - started
    save_grid(images, args.out)
    print(f"wrote {args.num} samples ({args.sampler}, {steps} steps, seed {args.seed}) to {args.out} in {seconds:.1f} s")
    return {"path": str(args.out), "num": args.num, "sampler": args.sampler, "steps": steps, "eta": args.eta,
            "seed": args.seed, "seconds": seconds}


def run_speed(args: argparse.Namespace, ddpm: DDPM) -> dict:
    steps = check_steps(ddpm, args.steps)
    result = sampling_speed(ddpm, args.sampler, steps, args.batch_size, args.repeats, args.eta, args.progress)
    print(f"{result['images_per_s']:.2f} images/s ({args.sampler}, {steps} steps, batch {args.batch_size}, "
          f"{result['ms_per_step']:.1f} ms per step, median of {args.repeats}, {result['device']})")
    return result


def run_fid(args: argparse.Namespace, ddpm: DDPM) -> dict:
    steps = check_steps(ddpm, args.steps)
    detector = load_inception(args.inception, ddpm.device)  # first: fail before any slow sampling
    mu_ref, sigma_ref = reference_statistics(args, ddpm, detector)
    samples = sample_images(ddpm, args.num_samples, args.batch_size, args.sampler, steps, args.eta, args.seed,
                            args.progress)
    mu, sigma = feature_statistics(inception_features(detector, samples, ddpm.device, args.inception_batch))
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    reference = args.ref_stats or f"{dataset_name(args, ddpm)} {args.split}"
    print(f"FID {fid:.3f} ({args.num_samples} samples, {args.sampler} {steps} steps, against {reference})")
    return {"fid": fid, "num_samples": args.num_samples, "sampler": args.sampler, "steps": steps, "eta": args.eta,
            "seed": args.seed, "reference": reference}


def check_scorable(args: argparse.Namespace, ddpm: DDPM) -> None:
    if ddpm.image_shape != IMAGE_SHAPE:
        shape = "x".join(map(str, ddpm.image_shape))
        raise EvalError(f"score judges MNIST-like models (1x28x28 images) with a digit classifier; this model makes "
                        f"{shape} images. For other models use FID: ddpm-eval fid --inception PATH")
    if dataset_name(args, ddpm) != "mnist":
        raise EvalError(f"score trains its classifier on MNIST (--data mnist), not on {args.data!r}")
    if args.num < 2:
        raise EvalError(f"-n must be at least 2 (the Frechet distance needs a covariance), got {args.num}")


def announce_training(cache_file: Path) -> None:
    print(f"training the score's MNIST classifier (once, a few minutes; cached as {cache_file})", file=sys.stderr)


def run_score(args: argparse.Namespace, ddpm: DDPM) -> dict:
    steps = check_steps(ddpm, args.steps)
    check_scorable(args, ddpm)
    data_path = dataset_path("mnist", resolve_data_path(args, "mnist"))
    scorer = load_or_train_scorer(data_path, args.cache_dir, device=ddpm.device,  # first: fail before any slow sampling
                                  on_training=announce_training)
    test_images = load_dataset("mnist", "test", str(data_path), 28, 1)
    if len(test_images) < args.num:
        raise EvalError(f"-n {args.num} is more than the {len(test_images)} test images of {data_path} (the reference)")
    started = time.perf_counter()
    samples = sample_images(ddpm, args.num, args.batch_size, args.sampler, steps, args.eta, args.seed, args.progress)
    seconds = time.perf_counter() - started
    scores = {"samples": scorer.score(samples), "real": scorer.mean_score(test_images, args.num)}
    real = scores["real"]
    print(f"score of {args.num} samples ({args.sampler}, {steps} steps, {dtype_name(ddpm.dtype)}, seed {args.seed}; "
          f"{seconds:.1f} s), by the MNIST classifier (test accuracy {scorer.info['test_accuracy']:.2%})")
    print(f"  {'':10} {f'confident >= {CONFIDENCE}':>16} {'classes':>8} {'Frechet':>9}")
    for name, score in scores.items():
        print(f"  {name:10} {score['confident_share']:16.3f} {score['classes']:8.1f} {score['frechet']:9.3f}")
    spread = "" if real["frechet_std"] is None else f" (Frechet spread {real['frechet_std']:.3f}: one set's noise)"
    print(f"  real: the mean over {real['sets']} disjoint random sets of {args.num} test images{spread}")
    for name, score in scores.items():
        print(f"  confident per class 0..9, {name}: {' '.join(f'{round(c, 1):g}' for c in score['class_counts'])}")
    return {**scores, "sampler": args.sampler, "steps": steps, "eta": args.eta, "seed": args.seed,
            "batch_size": args.batch_size, "sampling_seconds": seconds, "classifier": scorer.info}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", default=DEFAULT_WEIGHTS, help=f"model file or diffusers folder (default: {DEFAULT_WEIGHTS})")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    common.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="the U-Net's compute dtype (default auto: bfloat16 where the device computes it natively)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    common.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: on when stderr is a terminal)")
    add_threads_argument(common)
    data = argparse.ArgumentParser(add_help=False)
    add_data_arguments(data, "mnist for 1 channel, else cifar10")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS))
    sampling.add_argument("--steps", type=int, default=None, help="denoising steps (default: all T)")
    sampling.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale")

    p = argparse.ArgumentParser(prog="ddpm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    nll = commands.add_parser("nll", parents=[common, data], help="bits/dim by the full variational bound")
    nll.add_argument("--split", default="test", choices=["train", "test"])
    nll.add_argument("--limit", type=int, default=None, help="first N images (default: the whole split)")
    nll.add_argument("--batch-size", type=int, default=64, help="images per batch")
    nll.add_argument("--t-chunk", type=int, default=4, help="timesteps per U-Net call (batch x chunk rows)")
    samples = commands.add_parser("samples", parents=[common, sampling], help="a PNG grid of samples")
    samples.add_argument("-n", "--num", type=int, default=64)
    samples.add_argument("--out", default="samples.png", help="PNG path (default: samples.png)")
    speed = commands.add_parser("speed", parents=[common, sampling], help="sampling speed in images/s")
    speed.add_argument("--batch-size", type=int, default=64)
    speed.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    fid = commands.add_parser(
        "fid", parents=[common, data, sampling], help="FID of samples against a dataset (needs --inception)",
        description=f"FID over Inception-v3 pool3 features. The network is not bundled: pass the TorchScript "
                    f"file {INCEPTION_URL} as --inception (loaded with torch.jit.load).")
    fid.add_argument("--inception", default=None, metavar="PATH", help="inception-2015-12-05.pt (TorchScript)")
    fid.add_argument("--num-samples", type=int, default=10000, help="generated images (the paper: 50000)")
    fid.add_argument("--num-reference", type=int, default=None, help="reference images (default: the whole split)")
    fid.add_argument("--split", default="train", choices=["train", "test"], help="reference split (the paper: train)")
    fid.add_argument("--ref-stats", default=None, metavar="NPZ", help="cache of the reference statistics: read if present, else written")
    fid.add_argument("--batch-size", type=int, default=100, help="sampling batch")
    fid.add_argument("--inception-batch", type=int, default=100)
    score = commands.add_parser(
        "score", parents=[common, data, sampling], help="sample quality by an MNIST classifier (MNIST-like models)",
        description="Share of samples a digit classifier calls with confidence >= 0.9, the classes they cover, and the "
                    "Frechet distance in its features, each also for as many real test images. The classifier is "
                    "trained on the MNIST training set on first use (a few minutes on a CPU) and cached.")
    score.add_argument("-n", "--num", type=int, default=256, help="samples; the reference: sets of as many real test images")
    score.add_argument("--batch-size", type=int, default=32, help="sampling batch")
    score.add_argument("--cache-dir", default=None,
                       help=f"the classifier's cache (default: ${CACHE_ENV}, else ~/.cache/ddpm-serve)")
    return p.parse_args(argv)


COMMANDS = {"nll": run_nll, "samples": run_samples, "speed": run_speed, "fid": run_fid, "score": run_score}


def evaluate(argv: list[str] | None = None) -> dict:
    """Run one ddpm-eval command; returns its results (what --json writes)."""
    args = parse_args(argv)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    set_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        ddpm = load(args.weights, device, args.dtype)
        result = {"command": args.command, "weights": str(args.weights), "dtype": dtype_name(ddpm.dtype),
                  **COMMANDS[args.command](args, ddpm)}
    except (CheckpointError, DatasetError, InceptionError, EvalError) as exc:
        sys.exit(f"ddpm-eval: {exc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    evaluate(argv)


if __name__ == "__main__":
    main()
