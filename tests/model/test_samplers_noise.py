"""Each image's noise: drawn on the CPU many steps at a time, the same numbers as one draw per
step, on every device; a retried step reads its noise again."""

from __future__ import annotations

import copy

import pytest
import torch

import model
import model.samplers.noise as noise_module
from model.samplers import NoiseStream, image_generator, stack_to

ALIGNED = [(1, 28, 28), (3, 32, 32), (1, 4, 4)]  # C*H*W a multiple of 16
UNALIGNED = [(1, 5, 5), (3, 7, 7), (1, 1, 17)]


def one_draw_per_position(seed: int, index: int, shape, count: int) -> list[torch.Tensor]:
    generator = image_generator(seed, index)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("shape", ALIGNED + UNALIGNED)
def test_torch_draws_k_images_at_once_as_k_draws_exactly_when_an_image_is_whole_blocks_of_16(shape):
    """What NoiseStream relies on: torch's CPU normal fill transforms uniforms in blocks of 16
    and redraws a ragged tail. If a torch release changes that, this test says so."""
    generator = torch.Generator().manual_seed(3)
    at_once = torch.randn((5, *shape), generator=generator)
    generator = torch.Generator().manual_seed(3)
    one_by_one = torch.stack([torch.randn(shape, generator=generator) for _ in range(5)])
    assert torch.equal(at_once, one_by_one) == (shape in ALIGNED)


@pytest.mark.parametrize("shape", ALIGNED + UNALIGNED)
def test_a_stream_gives_the_numbers_of_one_draw_per_position(shape, monkeypatch):
    monkeypatch.setattr(noise_module, "CHUNK_BYTES", 3 * 4 * torch.Size(shape).numel())  # chunks of 3
    stream = NoiseStream(seed=11, index=2, shape=shape, length=8)
    expected = one_draw_per_position(11, 2, shape, 8)
    for position in range(8):
        assert torch.equal(stream[position], expected[position]), position


def test_a_position_read_again_is_the_same_tensor_and_past_ones_are_gone(monkeypatch):
    monkeypatch.setattr(noise_module, "CHUNK_BYTES", 2 * 4 * 784)  # chunks of 2
    stream = NoiseStream(seed=0, index=0, shape=(1, 28, 28), length=5)
    first = stream[2]  # draws positions 0..1, then 2..3
    assert stream[2] is first and stream[3] is not first
    with pytest.raises(IndexError):
        stream[0]
    stream[4]
    with pytest.raises(IndexError, match="holds 5 positions"):
        stream[5]


def test_a_stream_draws_no_more_than_its_length():
    stream = NoiseStream(seed=0, index=0, shape=(1, 28, 28), length=1)
    stream[0]
    generator = image_generator(0, 0)
    torch.randn((1, 28, 28), generator=generator)
    assert torch.equal(stream.generator.get_state(), generator.get_state())


@pytest.mark.gpu
def test_noise_reaches_cuda_unchanged():
    rows = one_draw_per_position(5, 1, (3, 32, 32), 4)
    on_device = stack_to(rows, torch.device("cuda"))
    assert on_device.device.type == "cuda" and torch.equal(on_device.cpu(), torch.stack(rows))


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m_sde", "unipc"])
def test_a_seed_gives_the_same_image_on_the_cpu_and_on_cuda(tiny_ddpm, sampler):
    on_cuda = model.DDPM(copy.deepcopy(tiny_ddpm.unet).cuda(), tiny_ddpm.config)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gpu = on_cuda.sample(2, steps=10, sampler=sampler, seed=3)
    torch.testing.assert_close(gpu.cpu(), tiny_ddpm.sample(2, steps=10, sampler=sampler, seed=3), atol=1e-3, rtol=0)
