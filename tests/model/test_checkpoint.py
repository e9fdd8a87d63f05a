"""Our checkpoint format: exact round trips, and a clear CheckpointError for every broken input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model
from model import CheckpointError
from model.checkpoint import FORMAT_VERSION, read_checkpoint, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def contiguous_state(ddpm: model.DDPM) -> dict[str, torch.Tensor]:
    """The weights as safetensors' save_file wants them (sampling makes the U-Net channels_last)."""
    return {k: v.contiguous() for k, v in ddpm.unet.state_dict().items()}


def our_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def rewrite(source: Path, target: Path, metadata_changes: dict[str, str | None]) -> Path:
    """A copy of `source` with some metadata entries changed (None removes one)."""
    tensors, _, _ = read_checkpoint(source)
    metadata = our_metadata(source) | metadata_changes
    save_file(tensors, target, metadata={k: v for k, v in metadata.items() if v is not None})
    return target


def probe_input(ddpm: model.DDPM) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, *ddpm.image_shape, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([0, 17, 49])


# -- round trips -------------------------------------------------------------------------------
def test_save_then_load_is_exact(tiny_ddpm, tiny_weights, test_device):
    loaded = model.load(tiny_weights, device=test_device)
    assert loaded.config == tiny_ddpm.config
    assert loaded.info == tiny_ddpm.info == {"source": "tests"}
    saved, restored = tiny_ddpm.unet.state_dict(), loaded.unet.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k].cpu()) for k in saved)
    assert not loaded.unet.training and loaded.device == test_device
    x, t = probe_input(tiny_ddpm)
    with torch.no_grad():  # load prepares the U-Net for inference (layout, tables): float-close
        eps = loaded.unet(x.to(test_device), t.to(test_device)).cpu()
        torch.testing.assert_close(eps, tiny_ddpm.unet(x, t), atol=1e-5, rtol=0)


def test_the_file_is_self_describing(tiny_weights):
    metadata = our_metadata(tiny_weights)
    assert metadata["format"] == "ddpm-serve" and metadata["format_version"] == str(FORMAT_VERSION)
    assert metadata["kind"] == "inference"
    assert model.ModelConfig.from_dict(json.loads(metadata["config"])) == model.preset("tiny")


def test_save_writes_atomically_and_readably(tmp_path, tiny_ddpm):
    path = tmp_path / "nested" / "model.safetensors"
    model.save(tiny_ddpm, path)
    model.save(tiny_ddpm, path)  # overwriting is fine too
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left over
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_training_checkpoint_loads_its_ema_weights(tmp_path, tiny_ddpm):
    ema = tiny_ddpm.unet.state_dict()
    tensors = {f"ema.{k}": v for k, v in ema.items()}
    tensors |= {f"model.{k}": torch.zeros_like(v) for k, v in ema.items()}
    tensors["optim.step"] = torch.tensor(10.0)
    path = tmp_path / "train.safetensors"
    write_checkpoint(path, tensors, tiny_ddpm.config, kind="training", info={"step": 10})
    loaded = model.load(path)
    assert loaded.info == {"step": 10}
    assert all(torch.equal(v, ema[k]) for k, v in loaded.unet.state_dict().items())


# -- broken inputs ---------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such weights file") as excinfo:
        model.load(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(excinfo.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        model.load(path)


def test_truncated_file(tmp_path, tiny_weights):
    path = tmp_path / "truncated.safetensors"
    data = tiny_weights.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        model.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.touch()
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        model.load(path)


def test_safetensors_without_our_metadata(tmp_path, tiny_ddpm):
    path = tmp_path / "plain.safetensors"
    save_file(contiguous_state(tiny_ddpm), path)
    with pytest.raises(CheckpointError, match="not a ddpm-serve checkpoint"):
        model.load(path)


def test_wrong_format_version(tmp_path, tiny_weights):
    path = rewrite(tiny_weights, tmp_path / "v2.safetensors", {"format_version": "2"})
    with pytest.raises(CheckpointError, match="format version 2, this program reads version 1"):
        model.load(path)


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "bad config in metadata"),
        (None, "bad config in metadata"),
        (json.dumps({"unet": {"base_channels": 17}, "diffusion": {}}), "not divisible by norm_groups"),
        (json.dumps({"unet": {}, "diffusion": {"schedule": "quadratic"}}), "unknown schedule 'quadratic'"),
        (json.dumps({"unet": {"colour": True}, "diffusion": {}}), "unexpected keyword argument 'colour'"),
    ],
)
def test_bad_config_in_metadata(tmp_path, tiny_weights, config, message):
    path = rewrite(tiny_weights, tmp_path / "bad-config.safetensors", {"config": config})
    with pytest.raises(CheckpointError) as excinfo:
        model.load(path)
    assert message in str(excinfo.value)


def test_config_that_does_not_fit_the_weights(tmp_path, tiny_weights):
    mnist_config = json.dumps(model.preset("mnist").to_dict())
    path = rewrite(tiny_weights, tmp_path / "mismatch.safetensors", {"config": mnist_config})
    with pytest.raises(CheckpointError) as excinfo:
        model.load(path)
    message = str(excinfo.value)
    assert "weights do not fit the model config" in message
    assert "missing" in message and "wrong shape" in message and "conv_in.weight" in message


def test_a_missing_tensor_is_named(tmp_path, tiny_ddpm):
    state = tiny_ddpm.unet.state_dict()
    del state["conv_out.bias"]
    path = tmp_path / "partial.safetensors"
    write_checkpoint(path, state, tiny_ddpm.config, kind="inference")
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. conv_out\.bias\)"):
        model.load(path)


def test_a_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="a folder, but not a diffusers model"):
        model.load(tmp_path)


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("{broken", "unreadable diffusers config"),
        ("[1, 2]", "must hold JSON objects"),
        (json.dumps({"_class_name": "DDPMScheduler"}), "describes a DDPMScheduler, not a UNet2DModel"),
    ],
)
def test_a_diffusers_folder_with_a_bad_config(tmp_path, config_text, message):
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(CheckpointError, match=message):
        model.load(tmp_path)


@pytest.fixture
def tiny_diffusers_config(tmp_path) -> Path:
    """A unet folder's config.json for the tiny preset's shape, weights not yet written."""
    config = dict(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=[16, 32], layers_per_block=1,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        freq_shift=1, flip_sin_to_cos=False, attention_head_dim=None, downsample_padding=0, norm_eps=1e-6,
        norm_num_groups=8,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_diffusers_folder_without_weights(tiny_diffusers_config):
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors or .bin"):
        model.load(tiny_diffusers_config)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_a_diffusers_folder_with_corrupt_weights(tiny_diffusers_config, name):
    (tiny_diffusers_config / name).write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="unreadable weights"):
        model.load(tiny_diffusers_config)


def test_a_diffusers_folder_whose_weights_do_not_fit(tiny_diffusers_config, tiny_ddpm):
    """Our tiny U-Net's weights match the config; drop the attention to break the fit."""
    state = {k: v for k, v in contiguous_state(tiny_ddpm).items() if ".attentions." not in k}
    save_file(state, tiny_diffusers_config / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        model.load(tiny_diffusers_config)


def test_checkpoint_error_is_a_value_error():
    """Callers that only know ValueError (argument parsers, settings validators) still catch it."""
    assert issubclass(CheckpointError, ValueError)


# -- the package boundary ------------------------------------------------------------------------
def test_importing_model_pulls_in_no_server_code():
    probe = (
        "import sys, model; "
        "banned = {'server', 'fastapi', 'pydantic', 'pydantic_settings', 'uvicorn', 'starlette', 'prometheus_client'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
