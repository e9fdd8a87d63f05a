"""The GPU worker in one prepared run: is it correct and fast on CUDA? Ends with a PASS/FAIL table.

    bench/gpu_check.sh                      # on a GPU machine: about 8 minutes on one GPU
    bench/gpu_check.sh --cpu                # the same stages on the CPU (CUDA-only checks skip), < 3 minutes
    python -m bench.gpu_check --cpu --quick # the smallest settings (tests/test_gpu_check.py runs it)

Stages, in order:
  environment   versions, the device, the driver
  parity        CUDA against CPU: U-Net outputs, and samples of the same seeds (the seed contract)
  batch         a lane's eps alone and in batches of every size, TF32 off (the serving path) and on
  syncs         host-device syncs per U-Net call, per DDPM.sample step and per engine step (goal 0)
  engine        mixed requests, previews and an injected out-of-memory on the device; a sticky error
  speed         U-Net and engine images/s per model, batch and precision (fp32, TF32, bf16)
  train         training steps in fp32 and bf16, and --deterministic giving the same weights twice

Needs torch, numpy, pillow, safetensors, tqdm and, for the engine, pydantic (gpu_check.sh installs
carried wheels where it is missing). Models: the shipped MNIST weights, the cifar10 config with
random weights. Exit status 1 when a check fails.
"""

from __future__ import annotations

import os

# Read once, when cuBLAS first runs: the determinism check needs it set before any CUDA work.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import model  # noqa: E402
from model.data import to_uint8  # noqa: E402

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "ddpm-mnist.safetensors"
PRECISIONS = ("fp32", "tf32", "bf16")
DETERMINISM_STEPS = 2  # training steps run twice with --deterministic


@dataclass(frozen=True)
class Profile:
    device: torch.device
    check_model: str  # the model of the correctness stages
    invariance_batches: tuple[int, ...]  # batch sizes a lane's eps is compared in
    speed_batches: dict[str, tuple[int, ...]]  # model -> batch sizes timed
    timed_calls: int  # U-Net calls per speed figure
    engine_steps: int  # DDIM steps per image in the engine speed runs
    mixed_steps: tuple[int, int, int]  # respaced ddpm, ddim and full-length ddpm requests of the engine stage
    train_preset: str
    train_batch: int
    train_steps: int


PROFILES = {
    "gpu": Profile(torch.device("cuda", 0), "mnist", (8, 32, 128),
                   {"mnist": (1, 8, 32, 128), "cifar10": (1, 8, 32, 128)}, timed_calls=20, engine_steps=20,
                   mixed_steps=(50, 20, 1000), train_preset="cifar10", train_batch=128, train_steps=50),
    # On a CPU the cifar10 config takes seconds per call (tens in bf16, emulated without AVX512-BF16).
    "cpu": Profile(torch.device("cpu"), "mnist", (8, 32), {"mnist": (1, 8)}, timed_calls=2, engine_steps=3,
                   mixed_steps=(10, 8, 20), train_preset="tiny", train_batch=8, train_steps=10),
    "quick": Profile(torch.device("cpu"), "tiny", (2,), {"tiny": (1, 2)}, timed_calls=1, engine_steps=2,
                     mixed_steps=(4, 3, 6), train_preset="tiny", train_batch=2, train_steps=2),
}


# ---- the report ----------------------------------------------------------------------------

@dataclass
class Row:
    stage: str
    check: str
    status: str  # PASS, FAIL, SKIP or INFO
    detail: str


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, stage: str, check: str, status: str, detail: str = "") -> None:
        self.rows.append(Row(stage, check, status, detail))
        print(f"  {status:4}  {check}: {detail}", flush=True)

    def verdict(self, stage: str, check: str, passed: bool, detail: str) -> None:
        self.add(stage, check, "PASS" if passed else "FAIL", detail)

    def table(self) -> str:
        widths = [max(len(getattr(row, name)) for row in self.rows) for name in ("stage", "check", "status")]
        lines = []
        for row in self.rows:
            cells = [row.stage.ljust(widths[0]), row.check.ljust(widths[1]), row.status.ljust(widths[2]), row.detail]
            lines.append(" | ".join(cells).rstrip())
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return any(row.status == "FAIL" for row in self.rows)


class Unavailable(Exception):
    """A check this machine or this code cannot run; its row says why (SKIP)."""


@dataclass
class Check:
    profile: Profile
    report: Report
    workdir: Path
    _weights: dict[str, Path] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.profile.device

    def weights(self, name: str) -> Path:
        """The shipped file for mnist; else the preset with seeded random weights, saved once."""
        if name == "mnist":
            return SHIPPED_WEIGHTS
        if name not in self._weights:
            config = model.preset(name)
            path = self.workdir / f"{name}.safetensors"
            model.save(model.DDPM(random_unet(config), config, {"source": "gpu_check"}), path)
            self._weights[name] = path
        return self._weights[name]

    def load(self, name: str, device: torch.device | None = None, precision: str = "fp32") -> model.DDPM:
        dtype = "bfloat16" if precision == "bf16" else "float32"
        try:
            return model.load(self.weights(name), device or self.device, dtype=dtype)
        except TypeError as exc:
            if "dtype" in str(exc):
                raise Unavailable("this model.load has no dtype option") from None
            raise


def random_unet(config: model.ModelConfig) -> model.UNet:
    """Seeded noise for every weight: a fresh U-Net predicts eps = 0 (zero-initialised output
    layer), which would make every comparison pass. Norm scales stay near 1."""
    unet = model.UNet(config.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            centre = 1.0 if param.dim() == 1 and name.endswith("weight") else 0.0
            param.copy_(centre + 0.05 * torch.randn(param.shape, generator=generator))
    return unet


def run_stage(check: Check, name: str, stage: Callable[[Check], None]) -> None:
    print(f"== {name}", flush=True)
    began = time.perf_counter()
    try:
        stage(check)
    except Unavailable as exc:
        check.report.add(name, "stage", "SKIP", str(exc))
    except Exception as exc:  # a check script reports a broken stage and goes on to the next
        traceback.print_exc()
        check.report.add(name, "stage", "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    print(f"   ({time.perf_counter() - began:.1f} s)", flush=True)


def needs_cuda(check: Check, what: str) -> None:
    if check.device.type != "cuda":
        raise Unavailable(f"{what} needs CUDA (--cpu run)")


# ---- helpers -------------------------------------------------------------------------------

@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN convolutions and matmuls inside: the legacy flags, which every torch since 2.3 reads."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def engines_keep_tf32() -> Iterator[None]:
    """Engines built inside leave the TF32 flags alone (they turn TF32 off: their serving policy)."""
    import server.engine.engine as engine_module

    policy = engine_module.serve_in_full_fp32
    engine_module.serve_in_full_fp32 = lambda device: None
    try:
        yield
    finally:
        engine_module.serve_in_full_fp32 = policy


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of fn, after one untimed call."""
    fn()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - began) / calls


def unet_inputs(ddpm: model.DDPM, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x and t drawn on the CPU (the same numbers for every device), then moved."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *ddpm.image_shape, generator=generator)
    t = torch.randint(0, ddpm.diffusion.num_timesteps, (batch,), generator=generator)
    return x.to(ddpm.device), t.to(ddpm.device)


def grey_levels(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images).cpu().numpy().astype(int)


def decode_png(png: bytes) -> np.ndarray:
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png))).astype(int)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


@dataclass
class SyncCount:
    count: int = 0


@contextlib.contextmanager
def counting_syncs(thread_name: str | None = None) -> Iterator[SyncCount]:
    """Host-device syncs CUDA reports (torch.cuda.set_sync_debug_mode) while inside, in all
    threads or in the one of that name (the engine's)."""
    counted = SyncCount()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message) and thread_name in (None, threading.current_thread().name):
            counted.count += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counted
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---- the engine, driven from here ------------------------------------------------------------

@dataclass
class Outcome:
    event: object  # Done or Failed
    frames: int


def serve(ddpm: model.DDPM, specs: list, max_batch: int,
          on_started: Callable[[], None] | None = None) -> tuple[list[Outcome], dict, bool]:
    """Runs an engine on `ddpm` until every spec has ended: (outcomes, stats, ready at the end).
    on_started: called once the engine has started (warmed up), before the first submit."""
    from server.contract import Done, EngineConfig, Failed, Frame, validate
    from server.engine import Engine

    async def collect(handle) -> Outcome:
        frames, last = 0, None
        async for event in handle.events():
            frames += isinstance(event, Frame)
            last = event if isinstance(event, (Done, Failed)) else last
        return Outcome(last, frames)

    async def session():
        config = EngineConfig(max_batch=max_batch, max_queue=max(256, 2 * len(specs)), max_preview_fps=1000.0,
                              max_images_per_request=16)
        engine = Engine(ddpm, config)
        await engine.start()
        if on_started is not None:
            on_started()
        try:
            limits = engine.model_info().limits
            handles = [engine.submit(validate(spec, limits)) for spec in specs]
            outcomes = await asyncio.gather(*(collect(handle) for handle in handles))
            return outcomes, engine.stats(), engine.ready
        finally:
            await engine.shutdown(grace_s=0)

    return asyncio.run(session())


def engine_available() -> None:
    try:
        import server.engine  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"the engine cannot be imported ({exc}); bench/gpu_check.sh installs carried wheels "
                          f"(bench/gpu_check.sh --fetch-wheels where PyPI answers)") from None


# ---- stages --------------------------------------------------------------------------------

def environment(check: Check) -> None:
    report = check.report
    report.add("environment", "python / torch", "INFO",
               f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
    report.add("environment", "CPU", "INFO", f"{cpu_name()}, {os.cpu_count()} cores, "
                                             f"{torch.get_num_threads()} torch threads")
    if check.device.type == "cuda":
        available = torch.cuda.is_available()
        report.verdict("environment", "CUDA device", available,
                       f"{torch.cuda.get_device_name(check.device)}, capability "
                       f"{torch.cuda.get_device_capability(check.device)}, "
                       f"{torch.cuda.get_device_properties(check.device).total_memory / 2**30:.0f} GiB"
                       if available else "torch sees no CUDA device")
        report.add("environment", "driver", "INFO", nvidia_smi("driver_version") or "nvidia-smi not found")
    try:
        engine_available()
        report.add("environment", "engine importable", "PASS", "server.engine with its pydantic contract")
    except Unavailable as exc:
        report.add("environment", "engine importable", "FAIL", str(exc))


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def nvidia_smi(field_name: str) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def parity(check: Check) -> None:
    needs_cuda(check, "comparing CUDA with CPU")
    report, cpu = check.report, torch.device("cpu")
    on_cpu, on_cuda = check.load(check.profile.check_model, cpu), check.load(check.profile.check_model)
    x, t = unet_inputs(on_cpu, 8)
    with torch.inference_mode():
        reference = on_cpu.unet(x, t)
        for enabled in (False, True):
            with tf32(enabled):
                error = (on_cuda.unet(x.to(check.device), t.to(check.device)).cpu() - reference).abs().max().item()
            label = "TF32" if enabled else "fp32"
            if enabled:
                report.add("parity", f"U-Net eps, CUDA {label} vs CPU", "INFO", f"max |diff| {error:.2e}")
            else:
                report.verdict("parity", f"U-Net eps, CUDA {label} vs CPU", error < 1e-4, f"max |diff| {error:.2e}")
    # The seed contract: noise comes from CPU generators, so a seed is the same image on any device.
    for sampler, steps in (("ddim", 20), ("ddpm", 50)):
        images = [grey_levels(ddpm.sample(4, steps=steps, sampler=sampler, seed=7)) for ddpm in (on_cpu, on_cuda)]
        difference = np.abs(images[0] - images[1])
        same = difference.mean() < 0.5 and difference.max() <= 16
        report.verdict("parity", f"same seed, CPU vs CUDA ({sampler} {steps} steps)", same,
                       f"grey levels: mean |diff| {difference.mean():.3f}, max {difference.max()}"
                       + ("" if same else " (different noise: is it drawn by CPU generators?)"))


def batch_invariance(check: Check) -> None:
    """A lane's eps alone and as row 0 of larger batches (the others random)."""
    ddpm = check.load(check.profile.check_model)
    batches = check.profile.invariance_batches
    x, t = unet_inputs(ddpm, max(batches))
    modes = (False, True) if check.device.type == "cuda" else (False,)
    with torch.inference_mode():
        for enabled in modes:
            with tf32(enabled):
                alone = ddpm.unet(x[:1], t[:1])
                error = max((ddpm.unet(x[:b], t[:b])[:1] - alone).abs().max().item() for b in batches)
            label = "TF32 on" if enabled else "fp32 (TF32 off, the serving path)"
            detail = f"max |diff| of one lane's eps at batch 1 vs {batches}: {error:.2e}"
            if enabled:
                check.report.add("batch", label, "INFO", detail + (" (why TF32 is off)" if error >= 1e-4 else ""))
            else:
                check.report.verdict("batch", label, error < 1e-4, detail)
    if check.device.type != "cuda":
        check.report.add("batch", "TF32 on", "SKIP", "TF32 is a CUDA mode (--cpu run)")


def syncs(check: Check) -> None:
    needs_cuda(check, "counting host-device syncs")
    engine_available()
    from server.contract import GenerationSpec

    report = check.report
    ddpm = check.load(check.profile.check_model)
    x, t = unet_inputs(ddpm, 8)
    with torch.inference_mode():
        ddpm.unet(x, t)
        with counting_syncs() as unet_syncs:
            ddpm.unet(x, t)
    report.verdict("syncs", "per U-Net call", unet_syncs.count == 0, f"{unet_syncs.count}")

    def sample_syncs(steps: int) -> int:
        with counting_syncs("MainThread") as counted:
            ddpm.sample(4, steps=steps, sampler="ddim", seed=0)
        return counted.count

    sample_syncs(2)
    per_step = (sample_syncs(30) - sample_syncs(10)) / 20
    report.verdict("syncs", "per DDPM.sample step", per_step == 0, f"{per_step:g}")

    def engine_syncs(steps: int) -> int:
        with counting_syncs("ddpm-engine") as counted:
            serve(ddpm, [GenerationSpec(n=4, steps=steps, sampler="ddim", seed=0)], max_batch=8)
        return counted.count

    # Admission, warm-up and the final images cost the same in both runs: the difference is the steps'.
    per_step = (engine_syncs(30) - engine_syncs(10)) / 20
    report.verdict("syncs", "per engine step (engine thread)", per_step == 0, f"{per_step:g}")


class FaultyUNet(torch.nn.Module):
    """The U-Net; once armed, each call asks fault(batch size) for an error to raise instead."""

    def __init__(self, unet: torch.nn.Module, fault: Callable[[int], Exception | None]):
        super().__init__()
        self.unet, self.fault, self.armed, self.raised = unet, fault, False, 0

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def arm(self) -> None:
        self.armed = True

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        error = self.fault(x.shape[0]) if self.armed else None
        if error is not None:
            self.raised += 1
            raise error
        return self.unet(x, t)


def engine(check: Check) -> None:
    engine_available()
    import server.engine.scheduler as scheduler
    from server.contract import Done, GenerationSpec

    report, (respaced, ddim_steps, full) = check.report, check.profile.mixed_steps
    ddpm = check.load(check.profile.check_model)
    specs = [
        GenerationSpec(n=3, steps=respaced, sampler="ddpm", seed=1, preview_every=max(1, respaced // 4)),
        GenerationSpec(n=2, steps=ddim_steps, sampler="ddim", eta=0.5, seed=2, preview_every=2,
                       preview_kinds=("x0",)),
        GenerationSpec(n=4, steps=ddim_steps, sampler="ddim", seed=3),
        GenerationSpec(n=1, steps=min(full, ddpm.diffusion.num_timesteps), sampler="ddpm", seed=4),
    ]
    from server.engine.faults import OutOfMemoryError

    injector = FaultyUNet(ddpm.unet, lambda batch_size: None if injector.raised or batch_size <= 4
                          else OutOfMemoryError("injected by gpu_check"))
    regrow_after, scheduler.REGROW_AFTER_STEPS = scheduler.REGROW_AFTER_STEPS, 4  # see it grow back
    try:
        outcomes, stats, ready = serve(model.DDPM(injector, ddpm.config, ddpm.info), specs, max_batch=8,
                                       on_started=injector.arm)
    finally:
        scheduler.REGROW_AFTER_STEPS = regrow_after
    done = [isinstance(outcome.event, Done) for outcome in outcomes]
    report.verdict("engine", f"mixed requests on {check.device}", all(done) and ready,
                   f"{sum(done)}/{len(done)} done, ready {ready}")
    worst = 0
    for spec, outcome in zip(specs, outcomes, strict=True):
        if isinstance(outcome.event, Done):
            reference = grey_levels(ddpm.sample(spec.n, steps=spec.steps, sampler=spec.sampler, eta=spec.eta,
                                                seed=spec.seed))
            got = np.stack([decode_png(image.png) for image in outcome.event.images])
            worst = max(worst, int(np.abs(got - reference).max()))
    report.verdict("engine", "images equal DDPM.sample of their seeds", worst <= 1, f"max {worst} grey levels")
    report.verdict("engine", "previews", outcomes[0].frames > 0 and outcomes[1].frames > 0,
                   f"frames per request: {[outcome.frames for outcome in outcomes]}")
    report.verdict("engine", "injected out-of-memory: retried, cap regrown",
                   injector.raised == 1 and stats["batch_cap"] == 8,
                   f"{injector.raised} raised, batch cap at the end {stats['batch_cap']} of 8")
    sticky_error(check, ddpm)


def sticky_error(check: Check, ddpm: model.DDPM) -> None:
    from server.contract import Failed, GenerationSpec

    broken = FaultyUNet(ddpm.unet, lambda batch_size: RuntimeError(
        "CUDA error: an illegal memory access was encountered (injected by gpu_check)"))
    outcomes, _, ready = serve(model.DDPM(broken, ddpm.config, ddpm.info),
                               [GenerationSpec(n=1, steps=3, sampler="ddim", seed=0)], max_batch=8,
                               on_started=broken.arm)
    event = outcomes[0].event
    code = event.code if isinstance(event, Failed) else type(event).__name__
    check.report.verdict("engine", "sticky device error: fails loudly, unhealthy", code == "device_error" and not ready,
                         f"request {code}, ready {ready}")


def speed(check: Check) -> None:
    for name, batches in check.profile.speed_batches.items():
        for precision in PRECISIONS:
            if precision == "tf32" and check.device.type != "cuda":
                check.report.add("speed", f"{name} {precision}", "SKIP", "TF32 is a CUDA mode (--cpu run)")
                continue
            try:
                ddpm = check.load(name, precision=precision)
            except Unavailable as exc:
                check.report.add("speed", f"{name} {precision}", "SKIP", str(exc))
                continue
            with tf32(precision == "tf32"):
                unet_figures = [unet_speed(check, ddpm, batch) for batch in batches]
                with engines_keep_tf32() if precision == "tf32" else contextlib.nullcontext():
                    engine_figures = [engine_speed(check, ddpm, batch) for batch in batches]
            check.report.add("speed", f"{name} {precision} U-Net img/s", "INFO", figures(batches, unet_figures))
            check.report.add("speed", f"{name} {precision} engine image-steps/s", "INFO",
                             figures(batches, engine_figures))
            del ddpm
            if check.device.type == "cuda":
                torch.cuda.empty_cache()


def figures(batches: tuple[int, ...], values: list[float]) -> str:
    return ", ".join(f"b{batch} {value:,.0f}" if value >= 100 else f"b{batch} {value:.3g}"
                     for batch, value in zip(batches, values, strict=True))


def unet_speed(check: Check, ddpm: model.DDPM, batch: int) -> float:
    x, t = unet_inputs(ddpm, batch)
    with torch.inference_mode():
        return batch / timed(check.device, lambda: ddpm.unet(x, t), check.profile.timed_calls)


def engine_speed(check: Check, ddpm: model.DDPM, batch: int) -> float:
    """Image-steps per second: `batch` one-image requests of engine_steps DDIM steps, submitted at once."""
    engine_available()
    from server.contract import GenerationSpec

    steps = check.profile.engine_steps
    specs = [GenerationSpec(n=1, steps=steps, sampler="ddim", seed=i) for i in range(batch)]
    began = []
    serve(ddpm, specs, max_batch=batch, on_started=lambda: began.append(time.perf_counter()))
    return batch * steps / (time.perf_counter() - began[0])


def train(check: Check) -> None:
    from model.train import Trainer, parse_args

    profile, report = check.profile, check.report
    config = model.preset(profile.train_preset).unet
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * profile.train_batch, config.in_channels, config.image_size, config.image_size),
                           generator=generator, dtype=torch.uint8)

    def trainer(*extra: str) -> Trainer:
        argv = ["--preset", profile.train_preset, "--device", str(check.device), "--batch-size",
                str(profile.train_batch), "--out", str(check.workdir / "train"), *extra]
        return Trainer(parse_args(argv), images)

    for precision in ("fp32", "bf16"):
        run = trainer(*(["--bf16"] if precision == "bf16" else []))
        run.state.model.train()
        run.train_step(0)  # kernel set-up
        synchronize(check.device)
        began = time.perf_counter()
        losses = [run.train_step(step)[0] for step in range(1, profile.train_steps + 1)]
        synchronize(check.device)
        rate = profile.train_steps / (time.perf_counter() - began)
        losses = [loss.item() for loss in losses]
        report.verdict("train", f"{profile.train_preset} batch {profile.train_batch}, {profile.train_steps} steps "
                       f"{precision}", all(np.isfinite(losses)),
                       f"{rate:.2f} steps/s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    try:
        weights = []
        for _ in range(2):
            run = trainer("--deterministic", "--dropout", "0.1")
            run.state.model.train()
            for step in range(DETERMINISM_STEPS):
                run.train_step(step)
            weights.append([p.detach().cpu() for p in run.state.model.parameters()])
        same = all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
        report.verdict("train", "--deterministic: the same weights twice", same, "bit for bit" if same else "differ")
    finally:
        torch.use_deterministic_algorithms(deterministic[0])
        torch.backends.cudnn.deterministic = deterministic[1]


STAGES = {"environment": environment, "parity": parity, "batch": batch_invariance, "syncs": syncs,
          "engine": engine, "speed": speed, "train": train}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run every stage on the CPU (CUDA-only checks skip)")
    parser.add_argument("--quick", action="store_true", help="the tiny model and the fewest steps (tests)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "cpu" if args.cpu else "gpu"]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        check = Check(profile, Report(), Path(workdir))
        for name in args.stages:
            run_stage(check, name, STAGES[name])
    elapsed = time.perf_counter() - began
    print(f"\n{check.report.table()}\n\n{'FAIL' if check.report.failed else 'PASS'} in {elapsed:.0f} s "
          f"on {profile.device}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"elapsed_s": elapsed, "device": str(profile.device),
                                         "rows": [row.__dict__ for row in check.report.rows]}, indent=1))
    return 1 if check.report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
