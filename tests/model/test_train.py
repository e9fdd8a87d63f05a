"""ddpm-train end to end on the tiny preset: learning, exact resume, DDP, signals, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model
from model.checkpoint import read_checkpoint
from model.train import Trainer, TrainingError, init_distributed, main, parse_args, pick_device, process_device, unwrap

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


def train_argv(out: Path, data_path: Path, steps: int, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data", "mnist", "--data-path", str(data_path), "--out", str(out),
            "--steps", str(steps), "--device", "cpu", "--sample-every", "0", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_mnist(tmp_path, mnist_path):
    main(train_argv(tmp_path, mnist_path, 40, "--limit", "512", "--log-every", "5", "--save-every", "0",
                    "--sample-every", "40"))
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 8
    # The zero-initialised output layer starts at loss ~1 (it predicts eps = 0).
    assert losses[0] > 0.5
    assert max(losses[-2:]) < 0.6 * losses[0], losses
    assert (tmp_path / "samples" / "step0000040.png").is_file()
    ddpm = model.load(tmp_path / "model.safetensors")
    assert ddpm.info["step"] == 40 and ddpm.info["dataset"] == "mnist"
    assert torch.isfinite(ddpm.sample(2, steps=5, sampler="ddim")).all()


def test_resume_continues_exactly(tmp_path, synthetic_mnist):
    # Dropout and flips on, so every kind of random draw has to be reproduced after the resume.
    extra = ("--dropout", "0.1", "--flip", "--batch-size", "8", "--log-every", "1", "--save-every", "0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    main(train_argv(straight, synthetic_mnist, 6, *extra))
    main(train_argv(split, synthetic_mnist, 3, *extra))
    main(train_argv(split, synthetic_mnist, 6, *extra, "--resume", str(split / "checkpoint.safetensors")))

    expected, _, expected_meta = read_checkpoint(straight / "checkpoint.safetensors")
    resumed, _, resumed_meta = read_checkpoint(split / "checkpoint.safetensors")
    assert resumed_meta["info"]["step"] == expected_meta["info"]["step"] == 6
    assert set(resumed) == set(expected)
    assert any(k.startswith("optim.") for k in expected) and any(k.startswith("ema.") for k in expected)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert [r["loss"] for r in metrics(split)] == pytest.approx([r["loss"] for r in metrics(straight)], abs=1e-6)


def test_init_starts_from_weights_with_a_fresh_optimizer(tmp_path, synthetic_mnist):
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    main(train_argv(first, synthetic_mnist, 3, "--batch-size", "8", "--save-every", "0"))
    start = model.load(first / "model.safetensors").unet.state_dict()
    main(train_argv(tuned, synthetic_mnist, 1, "--batch-size", "8", "--save-every", "0", "--lr", "0",
                    "--init", str(first / "model.safetensors")))
    tensors, _, meta = read_checkpoint(tuned / "checkpoint.safetensors")
    assert meta["info"]["step"] == 1  # counted from 0: a new run, not a resume
    for name, value in start.items():  # lr 0: model and EMA are still the initial weights
        torch.testing.assert_close(tensors["model." + name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(tensors["ema." + name], value, rtol=0, atol=0, msg=name)


def test_init_refuses_weights_of_another_config(tmp_path, synthetic_mnist):
    weights = REPO / "weights" / "ddpm-mnist.safetensors"
    with pytest.raises(SystemExit, match="different model config"):
        main(train_argv(tmp_path, synthetic_mnist, 1, "--init", str(weights)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, argv: list[str], out: Path) -> None:
    """What torchrun does for each process: set the env, then run the trainer."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(process_device("cpu"))
    try:
        trainer = Trainer(parse_args(argv))
        trainer.run()
        torch.save(unwrap(trainer.state.model).state_dict(), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_agree(tmp_path, synthetic_mnist):
    argv = train_argv(tmp_path, synthetic_mnist, 3, "--batch-size", "8", "--log-every", "1", "--dropout", "0.1")
    mp.spawn(ddp_worker, args=(2, free_port(), argv, tmp_path), nprocs=2, join=True)

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    saved, _, metadata = read_checkpoint(tmp_path / "checkpoint.safetensors")
    assert metadata["info"]["world_size"] == 2 and metadata["info"]["step"] == 3
    initial = model.UNet(model.preset("tiny").unet).state_dict()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), "the weights did not move"
    for key in rank0:
        assert torch.equal(saved[f"model.{key}"], rank0[key]), key


@pytest.mark.parametrize("name, local_rank, gpus, expected", [
    ("auto", 0, 0, "cpu"),
    ("auto", 1, 2, "cuda:1"),
    ("cuda", 0, 1, "cuda:0"),
    ("cuda", 1, 2, "cuda:1"),  # was cuda (no index) for every rank: all on GPU 0, and NCCL refused
    ("cuda:2", 1, 4, "cuda:3"),
    ("cpu", 1, 2, "cpu"),
])
def test_each_process_takes_its_own_gpu(name, local_rank, gpus, expected):
    assert pick_device(name, local_rank, gpus) == torch.device(expected)


@pytest.mark.parametrize("name, message", [("cuda:1", "needs GPU 2, but 2 are visible"), ("gpu", "unknown --device")])
def test_a_device_this_process_cannot_have_is_a_clear_error(name, message):
    with pytest.raises(TrainingError, match=message):
        pick_device(name, local_rank=1, gpus=2)


def test_the_process_group_uses_gloo_for_the_cpu_even_beside_a_gpu(monkeypatch):
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: backends.append(backend))
    init_distributed(torch.device("cpu"))
    init_distributed(torch.device("cuda", 0))
    assert backends == ["gloo", "nccl"]


@pytest.fixture
def restore_determinism():
    flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.deterministic = flags[1]


def test_deterministic_trains_with_deterministic_kernels(tmp_path, synthetic_mnist, restore_determinism):
    extra = ("--deterministic", "--dropout", "0.1", "--batch-size", "4", "--save-every", "0")
    main(train_argv(tmp_path / "a", synthetic_mnist, 2, *extra))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    main(train_argv(tmp_path / "b", synthetic_mnist, 2, *extra))
    first, _, _ = read_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    second, _, _ = read_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    assert all(torch.equal(first[key], second[key]) for key in first)


def run_cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model.train", *argv], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_saves_a_checkpoint_and_loses_no_step(tmp_path, synthetic_mnist):
    proc = run_cli(*train_argv(tmp_path, synthetic_mnist, 100_000, "--log-every", "1", "--save-every", "0"))
    log = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "fewer than 2 training steps in 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()

    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    _, _, metadata = read_checkpoint(tmp_path / "checkpoint.safetensors")
    last_logged = metrics(tmp_path)[-1]["step"]
    assert metadata["info"]["step"] == last_logged >= 2
    assert model.load(tmp_path / "model.safetensors").info["step"] == last_logged


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = run_cli(*train_argv(tmp_path, tmp_path / "nowhere" / "mnist.npz", 2))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    assert f"MNIST not found at {tmp_path / 'nowhere' / 'mnist.npz'}; pass --data-path" in stderr


@pytest.mark.parametrize("problem", ["missing", "garbage", "inference", "other config"])
def test_bad_resume_file_is_a_clear_error(tmp_path, synthetic_mnist, problem):
    resume = tmp_path / "resume.safetensors"
    expected = {
        "missing": "no such weights file",
        "garbage": "not a readable safetensors file",
        "inference": "an inference file, not a training checkpoint",
        "other config": "saved with a different model config",
    }[problem]
    if problem == "garbage":
        resume.write_bytes(b"definitely not safetensors")
    elif problem == "inference":
        model.save(model.DDPM(model.UNet(model.preset("tiny").unet), model.preset("tiny")), resume)
    elif problem == "other config":
        main(train_argv(tmp_path / "first", synthetic_mnist, 1, "--dropout", "0.2"))
        resume = tmp_path / "first" / "checkpoint.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tmp_path / "run", synthetic_mnist, 2, "--resume", str(resume)))
    message = str(exit_info.value.code)
    assert message.startswith("ddpm-train: ") and expected in message, message


def test_batch_not_divisible_by_processes_is_a_clear_error(tmp_path, synthetic_mnist, monkeypatch):
    monkeypatch.setattr("model.train.world_info", lambda: (0, 3))
    with pytest.raises(SystemExit, match="--batch-size 16 is not divisible by 3 processes"):
        main(train_argv(tmp_path, synthetic_mnist, 1))


def test_folder_dataset_trains_and_is_servable(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("L", (40, 32), color=40 * i).save(folder / f"{i}.png")
    main(["--preset", "tiny", "--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "2",
          "--batch-size", "4", "--device", "cpu", "--sample-every", "0", "--log-every", "1"])
    ddpm = model.load(tmp_path / "run" / "model.safetensors")
    assert ddpm.info["dataset"] == str(folder) and ddpm.info["step"] == 2



def test_rgb_folder_trains_a_three_channel_model_with_channels_3(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 0)]):
        Image.new("RGB", (32, 32), color=color).save(folder / f"{i}.png")
    argv = ["--preset", "tiny", "--data", str(folder), "--steps", "1", "--batch-size", "4", "--device", "cpu",
            "--sample-every", "0"]

    trainer = Trainer(parse_args([*argv, "--channels", "3", "--out", str(tmp_path / "rgb")]))
    assert tuple(trainer.images.shape) == (4, 3, 28, 28)
    assert trainer.images[0, 0].min() == 255 and trainer.images[0, 1:].max() == 0  # red stays red
    trainer.run()
    assert "data " + str(folder) + " (4 images, 3 channels, 28x28)" in capsys.readouterr().out
    ddpm = model.load(tmp_path / "rgb" / "model.safetensors")
    assert ddpm.image_shape == (3, 28, 28) and ddpm.config.unet.out_channels == 3

    main([*argv, "--out", str(tmp_path / "gray")])  # the preset's channels: 1, and the log says so
    assert "(4 images, 1 channel, 28x28)" in capsys.readouterr().out
    assert model.load(tmp_path / "gray" / "model.safetensors").image_shape == (1, 28, 28)


def test_threads_flag_sets_and_states_the_torch_threads(tmp_path, synthetic_mnist, capsys):
    main(train_argv(tmp_path, synthetic_mnist, 1, "--batch-size", "4", "--threads", "2"))
    assert torch.get_num_threads() == 2  # the one_torch_thread fixture restores it after the test
    assert "cpu, 2 threads," in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--threads", "-1"])


SPY_ON_TORCH_IMPORT = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Spy())
import model.{module}
print(seen[0])
"""


@pytest.mark.parametrize("module, given, expected", [("train", None, "PASSIVE"), ("evaluate", None, "PASSIVE"),
                                                     ("train", "ACTIVE", "ACTIVE")])
def test_the_clis_let_idle_openmp_threads_sleep_unless_told_otherwise(module, given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", SPY_ON_TORCH_IMPORT.format(module=module)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected  # what the environment held when torch loaded

def test_bf16_autocast_trains(tmp_path, synthetic_mnist):
    main(train_argv(tmp_path, synthetic_mnist, 2, "--bf16", "--batch-size", "4", "--log-every", "1"))
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    weights = model.load(tmp_path / "model.safetensors").unet.state_dict()
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
