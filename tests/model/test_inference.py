"""prepare_for_inference: the same function, faster; never stale; training untouched."""

from __future__ import annotations

import copy

import pytest
import torch

import model
from model.inference import prepare_for_inference
from model.unet import AttentionBlock, Upsample

CONFIG = model.preset("tiny")  # 28x28x1, attention at 14x14, T = 50
T = CONFIG.diffusion.num_timesteps


@pytest.fixture
def plain() -> model.UNet:
    torch.manual_seed(0)
    unet = model.UNet(CONFIG.unet).eval()
    # The zero-initialised output layers would hide differences: give every weight a value.
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.1)
    return unet


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 28, 28, generator=generator), torch.tensor([0, 17, T - 1])


def eps(unet: model.UNet, batch) -> torch.Tensor:
    with torch.inference_mode():
        return unet(*batch)


def test_prepared_computes_the_same_function(plain, batch):
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    expected, got = eps(plain, batch), eps(prepared, batch)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous()
    assert prepared.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert prepared.time_bias_table.table.shape[0] == T


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 4, 1, 1)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_as_phase_kernels_is_the_same_function(shape, layout):
    """Nearest 2x then a 3x3 conv, against one 2x2 conv per output phase at the input's size."""
    torch.manual_seed(0)
    upsample = Upsample(shape[1], with_conv=True).eval()
    torch.nn.init.normal_(upsample.conv.bias)
    x = torch.randn(shape).to(memory_format=layout)
    with torch.inference_mode():
        expected = upsample(x)
        upsample.prepack()
        got = upsample(x)
    assert got.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attention_with_folded_projections_is_the_same_function(layout):
    """Queries and values from one folded 1x1 conv, the normed input as keys: the same output,
    whatever the biases (softmax ignores the key bias's per-row constant)."""
    torch.manual_seed(0)
    attention = AttentionBlock(16, groups=4, eps=1e-6).eval()
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 16, 5, 3).to(memory_format=layout)
    with torch.inference_mode():
        expected = attention(x)
        attention.prepack()
        got = attention(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_and_values_unchanged(plain):
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    before, after = plain.state_dict(), prepared.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prepared_copies_follow_in_place_weight_updates(plain, batch):
    """An EMA update (in place, in eval mode) must leave neither the time-bias table nor a
    prepacked conv weight behind."""
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    eps(prepared, batch)
    target = copy.deepcopy(plain)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        torch._foreach_lerp_(list(prepared.parameters()), list(target.parameters()), 1.0)
    assert torch.allclose(eps(prepared, batch), eps(target, batch), atol=1e-5, rtol=1e-5)


def test_table_follows_load_state_dict(plain, batch):
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    eps(prepared, batch)
    fresh = model.UNet(CONFIG.unet).eval()
    prepared.load_state_dict(fresh.state_dict())
    assert torch.allclose(eps(prepared, batch), eps(fresh, batch), atol=1e-5, rtol=1e-5)


def test_prepared_unet_can_be_deep_copied(plain, batch):
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    eps(prepared, batch)
    copied = copy.deepcopy(prepared)
    assert torch.allclose(eps(copied, batch), eps(plain, batch), atol=1e-5, rtol=1e-5)


def test_training_after_prepare_matches_plain_gradients(plain, batch):
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    grads = []
    for unet in (plain, prepared):
        unet.train()
        unet.zero_grad()
        unet(*batch).square().mean().backward()
        grads.append(unet.time_embedding.linear_1.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_eval_mode_with_autograd_does_not_use_the_table(plain, batch):
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    prepared(*batch).sum().backward()
    assert prepared.time_embedding.linear_2.weight.grad is not None


def test_prepare_twice_keeps_the_table(plain):
    prepared = prepare_for_inference(plain, T)
    table = prepared.time_bias_table
    assert prepare_for_inference(prepared, T).time_bias_table is table
    assert prepare_for_inference(prepared, T + 1).time_bias_table.num_timesteps == T + 1


@pytest.mark.parametrize("bad_t", [-1, T])
def test_timestep_out_of_range_is_a_clear_error(plain, bad_t):
    prepared = prepare_for_inference(plain, T)
    with pytest.raises(ValueError, match=f"0..{T - 1}"):
        eps(prepared, (torch.zeros(1, 1, 28, 28), torch.tensor([bad_t])))


def test_bad_num_timesteps(plain):
    with pytest.raises(ValueError, match="num_timesteps"):
        prepare_for_inference(plain, 0)


def test_load_prepares_the_unet(plain, batch, tmp_path):
    path = tmp_path / "tiny.safetensors"
    model.save(model.DDPM(plain, CONFIG), path)
    ddpm = model.load(path)
    assert ddpm.unet.time_bias_table is not None and not ddpm.unet.training
    assert torch.allclose(eps(ddpm.unet, batch), eps(plain, batch), atol=1e-5, rtol=1e-5)


def test_sample_prepares_the_unet(plain):
    ddpm = model.DDPM(plain, CONFIG)
    images = ddpm.sample(2, steps=5, sampler="ddim", seed=3)
    assert ddpm.unet.time_bias_table is not None
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
