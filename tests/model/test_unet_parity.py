"""Our U-Net against diffusers' UNet2DModel with identical (random) weights, loaded through
`model.load` from the folders diffusers itself writes."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

import model
from model import CheckpointError
from model.diffusers_import import LEGACY_ATTENTION_KEYS

# google/ddpm-cifar10-32's unet/config.json. Every field is set: UNet2DModel's defaults differ
# (freq_shift 0, flip_sin_to_cos True, attention_head_dim 8, norm_eps 1e-5, downsample_padding 1).
# up_blocks run from the deepest level up, so the 16x16 attention sits in up_blocks.2.
DDPM_CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    freq_shift=1,
    flip_sin_to_cos=False,
    attention_head_dim=None,
    downsample_padding=0,
    norm_eps=1e-6,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    time_embedding_type="positional",
    mid_block_scale_factor=1,
)
# MNIST-shaped, attention at 14x14.
SMALL_28X28X1 = DDPM_CIFAR10_32 | dict(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
# Three levels, attention at the first and the last (16x16 and 4x4), two resnets per level.
SMALL_THREE_LEVEL = DDPM_CIFAR10_32 | dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    norm_num_groups=16,
)


@pytest.fixture
def diffusers_unet(randomize_weights):
    def build(config: dict, seed: int = 0) -> UNet2DModel:
        return randomize_weights(UNet2DModel(**config), seed=seed).eval()

    return build


def save_pipeline(unet: UNet2DModel, folder, variance_type: str = "fixed_large") -> None:
    """The layout of a hub DDPM: model_index.json, unet/, scheduler/scheduler_config.json."""
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=variance_type)).save_pretrained(folder)


def assert_same_eps(ours: model.DDPM, reference: UNet2DModel, batch: int) -> None:
    """eps for a batch whose rows sit at different timesteps (the engine mixes them)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *ours.image_shape, generator=generator)
    t = torch.linspace(0, 999, batch).round().long()  # 0 and 999 included, all different
    with torch.no_grad():
        expected = reference(x, t).sample
        inference = ours.unet(x, t)  # model.load prepared it: precomputed per-t time biases
    training = ours.unet(x, t).detach()  # autograd on: time biases computed from the weights
    assert expected.std() > 0.05, "random weights should give a non-trivial eps"
    assert inference.shape == training.shape == expected.shape
    assert (inference - expected).abs().max().item() <= 1e-4
    assert (training - expected).abs().max().item() <= 1e-4


def test_ddpm_cifar10_32_folder_is_the_paper_model(tmp_path, diffusers_unet):
    reference = diffusers_unet(DDPM_CIFAR10_32)
    save_pipeline(reference, tmp_path)
    ours = model.load(tmp_path)
    assert ours.config.unet == model.UNetConfig(dropout=0.0)  # the paper's CIFAR-10 U-Net, eval mode
    assert ours.config.diffusion == model.DiffusionConfig(variance_type="fixedlarge")
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters()) == 35_746_307
    assert ours.info["source"] == "diffusers"
    assert_same_eps(ours, reference, batch=2)


@pytest.mark.parametrize("config", [SMALL_28X28X1, SMALL_THREE_LEVEL], ids=["28x28x1", "three-level"])
def test_small_pipeline_folders_give_diffusers_eps(tmp_path, diffusers_unet, config):
    reference = diffusers_unet(config)
    save_pipeline(reference, tmp_path)
    ours = model.load(tmp_path)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert ours.image_shape == (config["in_channels"], config["sample_size"], config["sample_size"])
    assert_same_eps(ours, reference, batch=4)


def test_scheduler_config_sets_the_variance(tmp_path, diffusers_unet):
    save_pipeline(diffusers_unet(SMALL_28X28X1), tmp_path, variance_type="fixed_small")
    assert model.load(tmp_path).config.diffusion.variance_type == "fixedsmall"


def test_unet_folder_alone_loads_with_the_paper_schedule(tmp_path, diffusers_unet):
    reference = diffusers_unet(SMALL_THREE_LEVEL)
    reference.save_pretrained(tmp_path / "unet")
    ours = model.load(tmp_path / "unet")
    schedule = ours.config.diffusion
    assert (schedule.num_timesteps, schedule.schedule, schedule.beta_start, schedule.beta_end) == (
        1000, "linear", 1e-4, 0.02,
    )
    assert_same_eps(ours, reference, batch=3)


def legacy_key(key: str) -> str:
    for old, new in LEGACY_ATTENTION_KEYS.items():
        key = key.replace(new, old)
    return key


@pytest.mark.parametrize("legacy_names", [False, True], ids=["current-keys", "legacy-keys"])
@pytest.mark.parametrize("weights_file", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_older_weight_files_load(tmp_path, diffusers_unet, legacy_names, weights_file):
    """Older hub folders hold a pickled .bin and name attention layers query/key/value/proj_attn."""
    reference = diffusers_unet(SMALL_28X28X1)
    reference.save_pretrained(tmp_path, safe_serialization=weights_file.endswith(".safetensors"))
    assert (tmp_path / weights_file).is_file()
    if legacy_names:
        state = {legacy_key(k): v for k, v in reference.state_dict().items()}
        assert sum(k.endswith(".query.weight") for k in state) == 4  # attention: 1 down, 1 mid, 2 up
        (tmp_path / weights_file).unlink()
        if weights_file.endswith(".bin"):
            torch.save(state, tmp_path / weights_file)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / weights_file)
    assert_same_eps(model.load(tmp_path), reference, batch=2)


def write_unet_config(folder, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))


def cifar10_config_json(**changes) -> dict:
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in DDPM_CIFAR10_32.items()}
    return {k: v for k, v in (config | changes).items() if v is not ...}


@pytest.mark.parametrize(
    "changes, message",
    [
        # Each breaks parity with the paper's network; the loader must say so, not guess.
        (dict(freq_shift=0), "freq_shift=0"),
        (dict(flip_sin_to_cos=True), "flip_sin_to_cos=True"),
        (dict(downsample_padding=1), "downsample_padding=1"),
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
        (dict(attention_head_dim=64), "multi-head attention"),
        # An absent field means UNet2DModel's default, which here is not the paper's value.
        (dict(freq_shift=...), "freq_shift=0 (absent"),
        (dict(flip_sin_to_cos=...), "flip_sin_to_cos=True (absent"),
        (dict(attention_head_dim=...), "multi-head attention (attention_head_dim=8)"),
        # The brief's typo: attention at 8x8 on the way up but 16x16 on the way down.
        (dict(up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]), "do not mirror"),
        (dict(down_block_types=["DownBlock2D", "AttnSkipDownBlock2D", "DownBlock2D", "DownBlock2D"]),
         "must each be one of"),
        (dict(block_out_channels=[128, 192, 256, 256]), "not multiples of 128"),
        (dict(sample_size=[32, 64]), "non-square"),
        (dict(block_out_channels=...), "does not describe a DDPM U-Net"),
    ],
)
def test_unsupported_unet_configs_are_refused(tmp_path, changes, message):
    write_unet_config(tmp_path / "unet", **cifar10_config_json(**changes))
    with pytest.raises(CheckpointError) as excinfo:
        model.load(tmp_path)
    assert message in str(excinfo.value)
    assert str(tmp_path) in str(excinfo.value)


def test_multi_head_mid_block_is_refused(tmp_path):
    """attention_head_dim equal to the attention levels' width still splits a wider middle block."""
    config = cifar10_config_json(block_out_channels=[128, 256], layers_per_block=1,
                                 down_block_types=["AttnDownBlock2D", "DownBlock2D"],
                                 up_block_types=["UpBlock2D", "AttnUpBlock2D"], attention_head_dim=128)
    write_unet_config(tmp_path, **config)
    with pytest.raises(CheckpointError, match="multi-head attention"):
        model.load(tmp_path)


@pytest.mark.parametrize(
    "scheduler, message",
    [
        (dict(prediction_type="v_prediction"), "prediction_type 'v_prediction'"),
        (dict(beta_schedule="scaled_linear"), "unsupported beta_schedule 'scaled_linear'"),
        (dict(variance_type="learned_range"), "variance_type 'learned_range'"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
        (dict(thresholding=True), "only clipping x0"),
        (dict(clip_sample_range=2.0), "only clipping x0"),
    ],
)
def test_unsupported_scheduler_configs_are_refused(tmp_path, scheduler, message):
    write_unet_config(tmp_path / "unet", **cifar10_config_json())
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(CheckpointError) as excinfo:
        model.load(tmp_path)
    assert message in str(excinfo.value)
