"""ddpm-train: the paper's training recipe (Ho et al. 2020, sec. 4 and appendix B).

    ddpm-train --preset mnist --data mnist --steps 20000 --out runs/mnist
    ddpm-train --preset mnist --download                 # MNIST from its official source, into ./data
    ddpm-train --preset tiny --data FOLDER --channels 3  # a folder of RGB images

Adam, linear warmup, gradient clipping at 1.0, EMA of the weights, uniform t, L_simple.
Every random draw of step s (t, noise, dropout, flips) comes from the global generator
seeded by (seed, rank, s), and the data order from (seed, epoch), so --resume continues a
run exactly: nothing but the step needs saving besides the model, EMA and optimizer. On CUDA,
some kernels (cuDNN's convolution backward, atomics) sum in a varying order: a resumed run then
matches only to float rounding, unless --deterministic asks for deterministic kernels.
Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits (a second one
aborts at once). Multi-process training (DDP; nccl on CUDA devices, gloo on the CPU):

    torchrun --nproc_per_node 2 -m model.train --preset cifar10 --data cifar10

--batch-size is the global batch, split evenly across the processes. Each process takes its
own GPU: --device cuda (or auto) means cuda:LOCAL_RANK, cuda:N means cuda:N+LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .threads import add_threads_argument, set_threads, sleep_idle_threads

sleep_idle_threads()  # before torch loads, which reads it once (model.threads)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .checkpoint import CheckpointError, load_state, read_checkpoint, strip_prefix, write_checkpoint  # noqa: E402
from .config import PRESETS, ModelConfig, preset  # noqa: E402
from .data import DatasetError, load_dataset, save_grid, to_model_range  # noqa: E402
from .diffusion import GaussianDiffusion  # noqa: E402
from .download import add_data_arguments, resolve_data_path  # noqa: E402
from .pipeline import DDPM, save  # noqa: E402
from .samplers import derived_seed  # noqa: E402
from .unet import UNet  # noqa: E402


class TrainingError(ValueError):
    """A run that cannot start or go on (bad options, diverged loss); the message says why."""


@dataclass(frozen=True)
class Recipe:
    lr: float
    warmup: int
    batch_size: int
    ema_decay: float
    flip: bool
    grad_clip: float = 1.0


RECIPES = {
    "cifar10": Recipe(lr=2e-4, warmup=5000, batch_size=128, ema_decay=0.9999, flip=True),
    "lsun256": Recipe(lr=2e-5, warmup=5000, batch_size=64, ema_decay=0.9999, flip=True),
    # Short CPU runs: a larger lr and a shorter EMA horizon, or the EMA would still be mostly init.
    # No flips for digits: a mirrored digit is not a digit.
    "mnist": Recipe(lr=1e-3, warmup=500, batch_size=64, ema_decay=0.999, flip=False),
    "tiny": Recipe(lr=1e-3, warmup=10, batch_size=16, ema_decay=0.99, flip=False),
}


@dataclass
class TrainState:
    step: int
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ddpm-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist", choices=sorted(PRESETS), help="model config and recipe (default: mnist)")
    add_data_arguments(p, "the preset's dataset")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size (folder data)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3],
                   help="image channels of the model: 1 grayscale, 3 RGB (default: the preset's; folder data)")
    p.add_argument("--out", default=None, help="run folder for checkpoints, samples and metrics (default: runs/PRESET)")
    p.add_argument("--steps", type=int, default=20000, help="total optimizer steps (default: 20000)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size, split across processes")
    p.add_argument("--lr", type=float, default=None, help="peak Adam learning rate")
    p.add_argument("--warmup", type=int, default=None, help="linear lr warmup steps")
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm (0: off)")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="steps between metrics.jsonl lines")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--sample-every", type=int, default=2000, help="write a sample grid from the EMA weights (0: off)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the training grids (fast previews)")
    p.add_argument("--limit", type=int, default=None, help="use only N training images")
    p.add_argument("--resume", default=None, help="training checkpoint to continue from (OUT/checkpoint.safetensors)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start model and EMA from these weights (a fresh optimizer at step 0): fine-tune a shipped model")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun: the first GPU; rank r takes the r-th from it)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (slower on CUDA), so --resume matches a straight run bit for bit there too")
    add_threads_argument(p)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass (loss and schedule stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p.parse_args(argv)


def resolve_recipe(args: argparse.Namespace) -> tuple[ModelConfig, Recipe, str]:
    config = preset(args.preset)
    unet_changes = {}
    if args.image_size:
        unet_changes["image_size"] = args.image_size
    if args.channels:
        unet_changes.update(in_channels=args.channels, out_channels=args.channels)
    if args.dropout is not None:
        unet_changes["dropout"] = args.dropout
    if unet_changes:
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, **unet_changes))
    base = RECIPES[args.preset]
    overrides = {
        "lr": args.lr, "warmup": args.warmup, "batch_size": args.batch_size,
        "ema_decay": args.ema_decay, "flip": args.flip, "grad_clip": args.grad_clip,
    }
    recipe = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    data = args.data or ("cifar10" if config.unet.in_channels == 3 else "mnist")
    return config, recipe, data


def pick_device(name: str, local_rank: int, gpus: int) -> torch.device:
    """The device of the process with this LOCAL_RANK, given --device and the GPUs visible.
    auto: cuda when there is a GPU, else cpu. Every process on one machine takes its own GPU
    (two on one GPU stop NCCL): cuda means cuda:local_rank, cuda:N means cuda:N+local_rank."""
    if name == "auto":
        name = "cuda" if gpus else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    index = (device.index or 0) + local_rank
    if index >= gpus:
        raise TrainingError(f"--device {name} for local rank {local_rank} needs GPU {index}, "
                            f"but {gpus} {'is' if gpus == 1 else 'are'} visible")
    return torch.device("cuda", index)


def process_device(name: str) -> torch.device:
    """This process's device (pick_device under torchrun's LOCAL_RANK), made the current CUDA
    device so that NCCL and any tensor created without a device index land on it."""
    device = pick_device(name, int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def use_deterministic_algorithms() -> None:
    """--deterministic: kernels that give the same bits every run, or an error naming the op
    that has none. cuBLAS needs its workspace fixed before it starts (the variable is read once)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def learning_rate(recipe: Recipe, step: int) -> float:
    return recipe.lr * min(1.0, (step + 1) / max(recipe.warmup, 1))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    # Early on, average over the steps seen so far rather than towards the random init.
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


@functools.lru_cache(maxsize=1)
def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))


def epoch_batch(num_images: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at `step`: a fresh permutation per epoch, a function of (seed, step) alone."""
    per_epoch = max(num_images // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(num_images, seed, epoch)[offset * batch_size : (offset + 1) * batch_size]


def training_checkpoint(state: TrainState, config: ModelConfig, info: dict) -> dict:
    model = unwrap(state.model)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    optim = state.optimizer.state_dict()
    for index, slots in optim["state"].items():
        for name, value in slots.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    return dict(tensors=tensors, config=config, kind="training",
                info={**info, "step": state.step, "param_groups": optim["param_groups"]})


def read_same_config(path: str, config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, saved_config, metadata = read_checkpoint(path)
    if saved_config != config:
        raise CheckpointError(f"{path}: saved with a different model config than --preset gives")
    return tensors, metadata


def restore(state: TrainState, path: str, config: ModelConfig) -> None:
    tensors, metadata = read_same_config(path, config)
    if metadata.get("kind") != "training":
        raise CheckpointError(f"{path}: an inference file, not a training checkpoint (no optimizer state)")
    load_state(unwrap(state.model), strip_prefix(tensors, "model."), path)
    load_state(state.ema, strip_prefix(tensors, "ema."), path)
    slots: dict[int, dict] = {}
    for key, value in strip_prefix(tensors, "optim.").items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    state.optimizer.load_state_dict({"state": slots, "param_groups": metadata["info"]["param_groups"]})
    state.step = metadata["info"]["step"]


def initialise(state: TrainState, path: str, config: ModelConfig) -> None:
    """Model and EMA from an inference file (or a training checkpoint's EMA) of the same config."""
    tensors, metadata = read_same_config(path, config)
    if metadata.get("kind") == "training":
        tensors = strip_prefix(tensors, "ema.")
    load_state(state.model, tensors, path)
    load_state(state.ema, tensors, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; the loop then saves.

    A second signal restores the previous handlers and re-raises, for a run that must die now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.uninstall()
            signal.raise_signal(signum)
        self.requested = True


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, args: argparse.Namespace, images: torch.Tensor | None = None):
        """`images`: uint8 [N, C, H, W] to train on; by default loaded as --data and --limit say."""
        self.args = args
        self.config, self.recipe, self.data_name = resolve_recipe(args)
        self.rank, self.world = world_info()
        self.device = process_device(args.device)
        if args.deterministic:
            use_deterministic_algorithms()
        self.out = Path(args.out or f"runs/{args.preset}")
        if self.recipe.batch_size % self.world:
            raise TrainingError(f"--batch-size {self.recipe.batch_size} is not divisible by {self.world} processes")
        u = self.config.unet
        if images is None:
            data_path = resolve_data_path(args, self.data_name)
            images = load_dataset(self.data_name, "train", data_path, u.image_size, u.in_channels, args.limit)
        self.images = images
        self.diffusion = GaussianDiffusion(self.config.diffusion)
        self.state = self._build_state()
        self.stop = StopFlag()

    def _build_state(self) -> TrainState:
        torch.manual_seed(self.args.seed)
        model = UNet(self.config.unet).to(self.device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.recipe.lr, eps=1e-8)
        state = TrainState(0, model, ema, optimizer)
        if self.args.resume:
            restore(state, self.args.resume, self.config)
        elif self.args.init:
            initialise(state, self.args.init, self.config)
        if self.world > 1:
            state.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        if self.args.compile:
            state.model = torch.compile(state.model)
        return state

    def info(self) -> dict:
        return {"dataset": self.data_name, "preset": self.args.preset, "recipe": dataclasses.asdict(self.recipe),
                "seed": self.args.seed, "world_size": self.world}

    def describe(self) -> str:
        """The run in one line, printed at the start."""
        n, c, h, w = self.images.shape
        params = sum(p.numel() for p in unwrap(self.state.model).parameters())
        device = str(self.device)
        if self.device.type == "cpu":
            device += ", " + plural(torch.get_num_threads(), "thread")
        return (f"ddpm-train: preset {self.args.preset}, data {self.data_name} ({plural(n, 'image')}, "
                f"{plural(c, 'channel')}, {h}x{w}), {params / 1e6:.2f}M parameters, {device}, "
                f"steps {self.state.step}..{self.args.steps}, out {self.out}")

    def local_batch(self, step: int) -> torch.Tensor:
        indices = epoch_batch(len(self.images), self.recipe.batch_size, step, self.args.seed)
        x = to_model_range(self.images[indices[self.rank :: self.world]]).to(self.device)
        if self.recipe.flip:
            flip = torch.rand(x.shape[0], device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step. Returns (loss, grad norm) as tensors: reading them waits for the device."""
        torch.manual_seed(derived_seed(self.args.seed, (step + 1) * 1_000_003 + self.rank))
        state = self.state
        x0 = self.local_batch(step)
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(self.recipe, step)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.args.bf16 else contextlib.nullcontext()
        with autocast:
            loss = self.diffusion.training_loss(state.model, x0)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), self.recipe.grad_clip or math.inf)
        state.optimizer.step()
        update_ema(state.ema, unwrap(state.model), self.recipe.ema_decay, step)
        return loss.detach(), grad_norm

    def stop_requested(self) -> bool:
        """Every process stops after the same step, or DDP would wait forever for the ones that left."""
        if self.world == 1:
            return self.stop.requested
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoint.safetensors"
        write_checkpoint(path, **training_checkpoint(self.state, self.config, self.info()))
        final = DDPM(self.state.ema, self.config, {**self.info(), "step": self.state.step})
        save(final, self.out / "model.safetensors")
        return path

    def sample_grid(self) -> None:
        ddpm = DDPM(self.state.ema, self.config, {})
        steps = min(self.args.sample_steps, ddpm.diffusion.num_timesteps)
        images = ddpm.sample(64, steps=steps, sampler="ddim", seed=self.args.seed)
        save_grid(images, self.out / "samples" / f"step{self.state.step:07d}.png")

    def run(self) -> Path | None:
        """Train up to --steps; returns the checkpoint path (rank 0) or None (other ranks)."""
        args, state, main = self.args, self.state, self.rank == 0
        if main:
            print(self.describe(), flush=True)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps({"model": self.config.to_dict(), **self.info()}, indent=2))
        log = (self.out / "metrics.jsonl").open("a") if main else contextlib.nullcontext()
        bar = tqdm(total=args.steps, initial=state.step, disable=not main, dynamic_ncols=True, desc="train", unit="step")
        self.stop.install()
        try:
            with log, bar:
                self._loop(log, bar)
            if not main:
                return None
            path = self.save_checkpoint()
        finally:
            self.stop.uninstall()
        reason = "stopped by signal" if self.stop.requested else "done"
        print(f"ddpm-train: {reason} at step {state.step}; checkpoint {path}, weights {self.out / 'model.safetensors'}")
        return path

    def _loop(self, log, bar) -> None:
        args, state, main = self.args, self.state, self.rank == 0
        state.model.train()
        started = window_start = time.time()
        window_steps = 0
        while state.step < args.steps and not self.stop_requested():
            loss, grad_norm = self.train_step(state.step)
            state.step += 1
            window_steps += 1
            bar.update(1)
            log_now = state.step % args.log_every == 0 or state.step == args.steps
            save_now = args.save_every and state.step % args.save_every == 0
            if log_now or save_now:
                # Checked only here: reading the loss every step would stall the GPU queue.
                loss = check_finite(loss.item(), state.step)
            if main and log_now:
                rate = window_steps / (time.time() - window_start)
                record = {"step": state.step, "loss": loss, "grad_norm": grad_norm.item(),
                          "lr": learning_rate(self.recipe, state.step - 1), "steps_per_s": rate,
                          "elapsed_s": time.time() - started}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.4f}")
                window_start, window_steps = time.time(), 0
            if main and save_now:
                self.save_checkpoint()
            if main and args.sample_every and state.step % args.sample_every == 0:
                self.sample_grid()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def check_finite(loss: float, step: int) -> float:
    if not math.isfinite(loss):
        raise TrainingError(f"loss became {loss} at step {step}; lower --lr or check the data (last good checkpoint kept)")
    return loss


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices; gloo for the CPU, also on a machine that has GPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group with the backend `device` needs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(device))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    try:
        init_distributed(process_device(args.device))
        Trainer(args).run()
    except (DatasetError, CheckpointError, TrainingError) as exc:
        sys.exit(f"ddpm-train: {exc}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
