"""Time the U-Net of another git revision against the working tree's, in one process.

    .venv/bin/python -m bench.unet_revisions HEAD~1                  # cifar10 config, batch 1, 8, 32
    .venv/bin/python -m bench.unet_revisions main --preset mnist --batches 8 --rounds 11

This CPU's speed drifts by 10-30% from one minute to the next, so two benchmark runs made
minutes apart cannot tell a 3% change from noise. Here both U-Nets live in one process with
the same weights, each prepared for inference by its own revision's code, and every round
times them back to back in alternating order; the figure is the median of per-round ratios.
The other revision's `model/` package is taken with `git archive` and imported under
another name, so only `model/` has to differ.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import model
from bench.unet_forward import time_batches, with_nonzero_weights

REPO = Path(__file__).resolve().parent.parent


def import_model_at(revision: str, into: Path):
    """The `model` package as it is at `revision`, imported as `model_at_revision`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "model"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {revision} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "model").rename(into / "model_at_revision")
    sys.path.insert(0, str(into))
    return importlib.import_module("model_at_revision")


def prepare(package: str, unet, num_timesteps: int):
    """`unet` prepared for inference by `package`'s own code (`model`, or `model_at_revision`):
    its inference.prepare_for_inference, wherever that revision keeps the fast path (in
    model/unet.py before it moved to model/inference.py); eval() alone for revisions older than it."""
    try:
        inference = importlib.import_module(f"{package}.inference")
    except ModuleNotFoundError:
        return unet.eval()
    return inference.prepare_for_inference(unet, num_timesteps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("revision", help="a git revision (HEAD~1, main, a commit)")
    p.add_argument("--preset", default="cifar10", choices=sorted(model.PRESETS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=9, help="paired rounds per batch size")
    p.add_argument("--images-per-round", type=int, default=8,
                   help="forwards per round per model = max(1, this // batch)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        other = import_model_at(args.revision, Path(tmp))
        config = model.preset(args.preset)
        torch.manual_seed(args.seed)
        ours = with_nonzero_weights(model.UNet(config.unet))
        theirs = other.UNet(other.preset(args.preset).unet)
        theirs.load_state_dict(ours.state_dict())
        prepare("model", ours, config.diffusion.num_timesteps)
        prepare("model_at_revision", theirs, config.diffusion.num_timesteps)
        # Hooks the working tree's preparation set (none where it fell back to plain convolutions).
        packed = any(getattr(m, "fast_forward", None) is not None for m in ours.modules())

        @torch.inference_mode()
        def revision_forward(x, t):
            return theirs(x, t)

        @torch.inference_mode()
        def working_tree_forward(x, t):
            return ours(x, t)

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} U-Net; "
              f"working tree on the {'packed oneDNN' if packed else 'plain PyTorch'} path")
        # The difference is relative: with these small weights the outputs themselves are small.
        time_batches(args.preset, (args.revision, "working tree"), revision_forward, working_tree_forward, config,
                     args, show_difference=True)


if __name__ == "__main__":
    main()
