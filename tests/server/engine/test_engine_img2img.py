"""Image-to-image lanes (variation, inpainting, interpolation, reconstruction) in the engine:
what each operation promises, and the same images alone or beside plain lanes."""

from __future__ import annotations

import numpy as np
import pytest

from model.samplers import resampling_rows
from server.contract import EngineConfig, GenerationSpec, InvalidSpec, Progress
from server.contract.sources import Picture, Source, resampled_steps

from .conftest import decode_png, run, running_engine, submit

SHAPE = (1, 28, 28)


def picture(seed: int) -> Picture:
    """A blob digit-like picture: dark background, a bright square at a seed-chosen place."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros(SHAPE, dtype=np.uint8)
    y, x = rng.integers(4, 14, size=2)
    pixels[0, y:y + 12, x:x + 8] = 230
    return Picture(pixels.tobytes(), SHAPE)


def pixels(picture: Picture) -> np.ndarray:
    return np.frombuffer(picture.pixels, dtype=np.uint8).reshape(SHAPE[1:]).astype(int)


def images(done) -> list[np.ndarray]:
    return [decode_png(image.png).astype(int) for image in done.images]


def generate(ddpm, *specs: GenerationSpec, max_batch: int = 8):
    async def body():
        async with running_engine(ddpm, EngineConfig(max_batch=max_batch)) as engine:
            handles = [submit(engine, spec) for spec in specs]
            return [await handle.result() for handle in handles]

    return run(body())


def test_a_variation_at_strength_one_is_the_plain_image_of_its_seed(tiny_ddpm):
    plain, variation = generate(tiny_ddpm, GenerationSpec(n=2, steps=10, seed=4),
                                GenerationSpec(n=2, steps=10, seed=4, source=Source("variation", picture(0), 1.0)))
    for a, b in zip(images(plain), images(variation), strict=True):
        assert np.array_equal(a, b)


def test_a_small_strength_stays_close_to_the_input_and_runs_fewer_steps(tiny_ddpm):
    source = picture(1)
    done, = generate(tiny_ddpm, GenerationSpec(n=1, steps=10, sampler="ddim", seed=2,
                                               source=Source("variation", source, 0.1)))
    far, = generate(tiny_ddpm, GenerationSpec(n=1, steps=10, sampler="ddim", seed=2,
                                              source=Source("variation", source, 1.0)))
    near_error = np.abs(images(done)[0] - pixels(source)).mean()
    far_error = np.abs(images(far)[0] - pixels(source)).mean()
    assert near_error < 0.5 * far_error, (near_error, far_error)


def test_inpainting_keeps_the_known_pixels_exactly(tiny_ddpm):
    source = picture(2)
    keep = np.ones(SHAPE[1:], dtype=np.uint8)
    keep[8:20, 8:20] = 0
    spec = GenerationSpec(n=2, steps=10, seed=3, source=Source("inpaint", source, keep=keep.tobytes()))
    done, = generate(tiny_ddpm, spec)
    for image in images(done):
        assert np.array_equal(image[keep == 1], pixels(source)[keep == 1])
        assert not np.array_equal(image[keep == 0], pixels(source)[keep == 0])


def inpaint_source(image: Picture, **resampling) -> Source:
    keep = np.ones(SHAPE[1:], dtype=np.uint8)
    keep[8:20, 8:20] = 0
    return Source("inpaint", image, keep=keep.tobytes(), **resampling)


def test_resampled_inpainting_keeps_the_known_pixels_and_runs_repaints_steps(tiny_ddpm):
    source = inpaint_source(picture(2), jump_length=3, jump_n_sample=3)
    spec = GenerationSpec(n=2, steps=10, seed=3, source=source)

    async def body():
        async with running_engine(tiny_ddpm) as engine:
            handle = submit(engine, spec)
            totals = {event.total async for event in handle.events() if isinstance(event, Progress)}
            return totals, await handle.result()

    totals, done = run(body())
    assert totals == {resampled_steps(10, 3, 3)} == {len(resampling_rows(10, 3, 3))} == {28}
    keep = np.frombuffer(source.keep, dtype=np.uint8).reshape(SHAPE[1:])
    plain, = generate(tiny_ddpm, GenerationSpec(n=2, steps=10, seed=3, source=inpaint_source(picture(2))))
    for image, without in zip(images(done), images(plain), strict=True):
        assert np.array_equal(image[keep == 1], pixels(picture(2))[keep == 1])
        assert not np.array_equal(image[keep == 0], without[keep == 0])  # the resampling changed the rest


def test_one_sample_per_jump_is_no_resampling(tiny_ddpm):
    once, plain = generate(tiny_ddpm,
                           GenerationSpec(n=2, steps=10, seed=3, source=inpaint_source(picture(2), jump_n_sample=1)),
                           GenerationSpec(n=2, steps=10, seed=3, source=inpaint_source(picture(2))))
    for a, b in zip(images(once), images(plain), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(10, 3, 3), (25, 10, 10), (7, 10, 4), (50, 1, 2)])
def test_resampled_steps_counts_the_rows_repaint_visits(steps, jump_length, jump_n_sample):
    assert resampled_steps(steps, jump_length, jump_n_sample) == len(resampling_rows(steps, jump_length, jump_n_sample))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_multistep_samplers_start_from_an_image(tiny_ddpm, sampler):
    """A lane starting later has no history: its plan starts at first order (make_plan's start)."""
    source = picture(1)
    near, far = generate(tiny_ddpm,
                         GenerationSpec(n=1, steps=10, sampler=sampler, seed=2, source=Source("variation", source, 0.2)),
                         GenerationSpec(n=1, steps=10, sampler=sampler, seed=2, source=Source("variation", source, 1.0)))
    near_error = np.abs(images(near)[0] - pixels(source)).mean()
    far_error = np.abs(images(far)[0] - pixels(source)).mean()
    assert near_error < 0.5 * far_error, (near_error, far_error)
    plain, = generate(tiny_ddpm, GenerationSpec(n=1, steps=10, sampler=sampler, seed=2))
    assert np.array_equal(images(far)[0], images(plain)[0])


def test_interpolation_ends_are_the_reconstructions_of_its_inputs(tiny_ddpm):
    a, b = picture(3), picture(4)
    strip, first, second = generate(
        tiny_ddpm,
        GenerationSpec(steps=10, seed=9, source=Source("interpolate", a, other=b, lambdas=(0.0, 0.5, 1.0), t=30)),
        GenerationSpec(steps=10, seed=9, source=Source("reconstruct", a, timesteps=(30,))),
        GenerationSpec(steps=10, seed=9, source=Source("reconstruct", b, timesteps=(30,))),
    )
    strip_images = images(strip)
    assert len(strip_images) == 3 and [image.seed for image in strip.images] == [9, 9, 9]
    assert np.array_equal(strip_images[0], images(first)[0])
    assert np.array_equal(strip_images[2], images(second)[0])


def test_reconstruction_makes_one_image_per_t(tiny_ddpm):
    done, = generate(tiny_ddpm, GenerationSpec(steps=50, seed=1, source=Source("reconstruct", picture(5),
                                                                              timesteps=(1, 25, 50))))
    errors = [np.abs(image - pixels(picture(5))).mean() for image in images(done)]
    assert len(errors) == 3 and errors[0] < errors[2]  # from t=1 the input comes back nearly as it was


def test_image_lanes_beside_plain_lanes_give_the_images_they_give_alone(tiny_ddpm):
    keep = np.ones(SHAPE[1:], dtype=np.uint8)
    keep[:14] = 0
    specs = [
        GenerationSpec(n=2, steps=12, seed=1),
        GenerationSpec(n=2, steps=12, seed=2, source=Source("variation", picture(6), 0.6)),
        GenerationSpec(n=1, steps=8, sampler="ddim", eta=0.3, seed=3,
                       source=Source("inpaint", picture(7), keep=keep.tobytes())),
        GenerationSpec(steps=12, seed=4, source=Source("reconstruct", picture(8), timesteps=(10, 40))),
        GenerationSpec(n=2, steps=9, sampler="dpmpp_2m", seed=5),
        GenerationSpec(steps=10, sampler="unipc", seed=6, source=Source("reconstruct", picture(9), timesteps=(20, 45))),
        GenerationSpec(n=2, steps=9, seed=7, source=inpaint_source(picture(10), jump_length=2, jump_n_sample=2)),
    ]
    together = generate(tiny_ddpm, *specs, max_batch=6)
    for spec, crowd in zip(specs, together, strict=True):
        alone, = generate(tiny_ddpm, spec)
        for a, b in zip(images(alone), images(crowd), strict=True):
            assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("source, sampler, field", [
    (inpaint_source(picture(0), jump_n_sample=2), "dpmpp_2m", "sampler"),
    (inpaint_source(picture(0), jump_n_sample=0), "ddpm", "jump_n_sample"),
    (inpaint_source(picture(0), jump_length=0), "ddpm", "jump_length"),
    (inpaint_source(picture(0), jump_length=1, jump_n_sample=12), "ddpm", "jump_n_sample"),  # > 10 x T calls
    (Source("variation", picture(0), 0.0), "ddpm", "strength"),
    (Source("inpaint", picture(0), keep=b"\x01" * 10), "ddpm", "mask"),
    (Source("interpolate", picture(0), lambdas=(0.5,)), "ddpm", "image2"),
    (Source("interpolate", picture(0), other=picture(1), lambdas=(1.5,)), "ddpm", "lambdas"),
    (Source("reconstruct", picture(0), timesteps=(0,)), "ddpm", "timesteps"),
    (Source("reconstruct", picture(0), timesteps=()), "ddpm", "timesteps"),
    (Source("variation", Picture(bytes(3 * 28 * 28), (3, 28, 28))), "ddpm", "image"),
])
def test_bad_sources_name_their_field(tiny_ddpm, source, sampler, field):
    async def body():
        async with running_engine(tiny_ddpm) as engine:
            with pytest.raises(InvalidSpec) as error:
                submit(engine, GenerationSpec(sampler=sampler, source=source))
            return error.value

    assert run(body()).field == field
