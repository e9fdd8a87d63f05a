"""prepare_for_inference: the same function, faster; never stale; training untouched; a plain
fallback when the private oneDNN ops are absent or wrong; never a side effect of sampling."""

from __future__ import annotations

import copy
import dataclasses
import logging
import types

import pytest
import torch

import model
from model import inference
from model.inference import FoldedAttention, PackedConv, PhaseUpsample, TimeBiasTable, prepare_for_inference
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
    assert prepared.fast_time_biases.table.shape[0] == T
    assert isinstance(prepared.conv_in.fast_forward, PackedConv)


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
        upsample.fast_forward = PhaseUpsample(upsample)
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
        attention.fast_forward = FoldedAttention(attention)
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
    table = prepared.fast_time_biases
    assert prepare_for_inference(prepared, T).fast_time_biases is table
    assert prepare_for_inference(prepared, T + 1).fast_time_biases.num_timesteps == T + 1


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
    assert ddpm.unet.fast_time_biases is not None and not ddpm.unet.training
    assert torch.allclose(eps(ddpm.unet, batch), eps(plain, batch), atol=1e-5, rtol=1e-5)


def test_prepared_copy_uses_its_own_weights(plain, batch):
    """A deep copy's fast paths read the copy's weights, not the original's."""
    prepared = prepare_for_inference(copy.deepcopy(plain), T)
    eps(prepared, batch)
    copied = copy.deepcopy(prepared)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    halved = copy.deepcopy(plain)
    with torch.no_grad():
        for p in halved.parameters():
            p.mul_(0.5)
    assert torch.allclose(eps(copied, batch), eps(halved, batch), atol=1e-5, rtol=1e-5)
    assert torch.allclose(eps(prepared, batch), eps(plain, batch), atol=1e-5, rtol=1e-5)


# -- the fallback to plain convolutions ---------------------------------------------------
def uses_packed_path(unet: model.UNet) -> bool:
    return any(getattr(m, "fast_forward", None) is not None for m in unet.modules())


def raising_ops():
    def fail(*args):
        raise RuntimeError("no kernel for this CPU")
    return fail, fail


def wrong_ops():
    reorder, convolve = MKLDNN_OPS()
    return reorder, lambda *args: convolve(*args) * 1.01


MKLDNN_OPS = inference.mkldnn_ops


@pytest.mark.parametrize("breakage, reason", [
    ("ops removed", "missing or failed (AttributeError"),
    ("ops raise", "missing or failed (RuntimeError: no kernel for this CPU)"),
    ("ops disagree", "disagrees with F.conv2d"),
])
def test_load_falls_back_to_plain_convolutions(plain, tmp_path, monkeypatch, caplog, breakage, reason):
    path = tmp_path / "tiny.safetensors"
    model.save(model.DDPM(plain, CONFIG), path)
    with caplog.at_level(logging.WARNING, logger="model.inference"):
        packed = model.load(path)
    assert uses_packed_path(packed.unet) and not caplog.records
    expected = {sampler: packed.sample(3, steps=5, sampler=sampler, seed=7) for sampler in ("ddpm", "ddim")}
    if breakage == "ops removed":
        monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    else:
        monkeypatch.setattr(inference, "mkldnn_ops", raising_ops if breakage == "ops raise" else wrong_ops)

    with caplog.at_level(logging.WARNING, logger="model.inference"):
        fallback = model.load(path)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "plain PyTorch path" in caplog.records[0].getMessage() and reason in caplog.records[0].getMessage()
    assert not uses_packed_path(fallback.unet)
    # What stays: eval mode, channels_last, the time-bias table.
    assert not fallback.unet.training and isinstance(fallback.unet.fast_time_biases, TimeBiasTable)
    assert fallback.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for sampler, images in expected.items():
        got = fallback.sample(3, steps=5, sampler=sampler, seed=7)
        assert torch.allclose(got, images, atol=1e-4, rtol=0), (got - images).abs().max()


def test_fallback_undoes_an_earlier_packed_preparation(plain, monkeypatch, caplog):
    prepared = prepare_for_inference(plain, T)
    assert uses_packed_path(prepared)
    monkeypatch.setattr(inference, "mkldnn_ops", raising_ops)
    with caplog.at_level(logging.WARNING, logger="model.inference"):
        prepare_for_inference(prepared, T)
    assert len(caplog.records) == 1 and not uses_packed_path(prepared)


# -- sampling does not prepare ------------------------------------------------------------
def assert_unprepared(unet: model.UNet, modes: list[bool]) -> None:
    """Contiguous parameters (not channels_last), no fast paths, every module in `modes`."""
    assert all(p.stride() == p.contiguous().stride() for p in unet.parameters())
    assert not uses_packed_path(unet) and unet.fast_time_biases is None
    assert [m.training for m in unet.modules()] == modes


@pytest.mark.parametrize("training", [True, False])
def test_sample_leaves_the_unet_as_it_was(training):
    """As Trainer.sample_grid samples from the EMA model mid-training: no layout change, no fast
    paths, the same mode after; and no dropout during the call even in train mode."""
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIG, unet=dataclasses.replace(CONFIG.unet, dropout=0.5))
    unet = model.UNet(config.unet).train(training)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.1)
    modes = [m.training for m in unet.modules()]
    ddpm = model.DDPM(unet, config)
    images = ddpm.sample(2, steps=5, sampler="ddim", seed=3)
    assert_unprepared(unet, modes)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    in_eval = model.DDPM(copy.deepcopy(unet).eval(), config).sample(2, steps=5, sampler="ddim", seed=3)
    assert torch.equal(images, in_eval)


def test_trainer_sample_grid_leaves_the_ema_model_as_it_was(tmp_path, synthetic_mnist):
    from model.train import Trainer, parse_args

    args = parse_args(["--preset", "tiny", "--data", "mnist", "--data-path", str(synthetic_mnist),
                       "--out", str(tmp_path), "--steps", "1", "--device", "cpu", "--sample-steps", "2"])
    trainer = Trainer(args)
    ema = trainer.state.ema
    modes = [m.training for m in ema.modules()]
    trainer.sample_grid()
    assert_unprepared(ema, modes)
    assert any((tmp_path / "samples").glob("*.png"))


def test_ddpm_prepare_for_inference_is_explicit(plain, batch):
    ddpm = model.DDPM(copy.deepcopy(plain).train(), CONFIG)
    assert ddpm.prepare_for_inference() is ddpm
    assert not ddpm.unet.training and uses_packed_path(ddpm.unet)
    assert ddpm.unet.fast_time_biases.num_timesteps == T
    assert torch.allclose(eps(ddpm.unet, batch), eps(plain, batch), atol=1e-5, rtol=1e-5)
