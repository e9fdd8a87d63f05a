"""The official `openai` SDK against a running ddpm-serve (a real subprocess, the tiny model):
generations, variations, edits and streaming, authenticated with the SDK's api_key; and the
project's own image-to-image operations over JSON."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from model.data import to_uint8
from tests.server.api.live_server import run_server

KEY = "openai-sdk-test-key-0123456789"
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # images.create_variation


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with run_server(tiny_weights, tmp_path_factory.mktemp("openai"), "--api-keys", KEY) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def decode(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png)))).astype(int)


def png_file(array: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    image = Image.fromarray(array.astype(np.uint8), "L")
    if alpha is not None:
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def digit() -> np.ndarray:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[6:22, 11:17] = 240
    return pixels


def test_generate_gives_the_models_images_for_the_seed(client, tiny_ddpm):
    result = client.images.generate(prompt="a four", n=2, size="28x28",
                                    extra_body={"steps": 8, "sampler": "ddim", "seed": 5})
    expected = to_uint8(tiny_ddpm.sample(2, steps=8, sampler="ddim", seed=5)).squeeze(1).numpy()
    np.testing.assert_array_equal(np.stack([decode(image.b64_json) for image in result.data]), expected)
    assert result.model_extra["ignored"] == ["prompt"]


def test_a_variation_at_strength_one_is_the_seeds_plain_image(client, tiny_ddpm):
    result = client.images.create_variation(image=("digit.png", png_file(digit())),
                                            extra_body={"steps": 8, "seed": 6, "strength": 1.0})
    expected = to_uint8(tiny_ddpm.sample(1, steps=8, seed=6)).squeeze(1).numpy()
    np.testing.assert_array_equal(decode(result.data[0].b64_json), expected[0])


def test_an_edit_keeps_the_pixels_outside_the_mask(client):
    alpha = np.full((28, 28), 255)
    alpha[10:18, 10:18] = 0
    result = client.images.edit(image=("digit.png", png_file(digit())), mask=("mask.png", png_file(digit(), alpha)),
                                prompt="", n=2, extra_body={"steps": 8, "seed": 2})
    for image in result.data:
        got = decode(image.b64_json)
        np.testing.assert_array_equal(got[alpha == 255], digit()[alpha == 255])


def test_a_streamed_edit_sends_partial_images_then_the_final_one(client):
    alpha = np.full((28, 28), 255)
    alpha[:14] = 0
    events = list(client.images.edit(image=("d.png", png_file(digit())), mask=("m.png", png_file(digit(), alpha)),
                                     prompt="", stream=True, partial_images=2, extra_body={"steps": 30, "seed": 1}))
    types = [event.type for event in events]
    assert types[-1] == "image_edit.completed"
    assert 1 <= types.count("image_edit.partial_image") <= 2
    assert decode(events[-1].b64_json).shape == (28, 28)


def test_a_wrong_key_is_refused(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="")


def test_interpolation_over_json(server):
    import httpx

    image = base64.b64encode(png_file(digit())).decode()
    other = base64.b64encode(png_file(digit().T.copy())).decode()
    response = httpx.post(server.url + "/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json={
        "operation": "interpolate", "image": image, "image2": other, "lambdas": [0, 0.5, 1], "t": 20,
        "steps": 10, "seed": 3})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 3


def test_the_python_client_and_ddpm_generate_take_image_operations(server, tmp_path):
    from server.client import DDPMClient, main

    with DDPMClient(server.url, KEY) as ddpm:
        images = ddpm.generate(steps=10, seed=4, operation="reconstruct", image=png_file(digit()), timesteps=[5, 40])
        assert [image.seed for image in images] == [4, 4]
        job = ddpm.submit_job(steps=6, seed=1, operation="variation", image=png_file(digit()), strength=0.5)
        assert len(ddpm.wait_job(job["id"])) == 1
    source = tmp_path / "digit.png"
    source.write_bytes(png_file(digit()))
    status = main(["--url", server.url, "--api-key", KEY, "--steps", "6", "--seed", "2", "--quiet", "-o",
                   str(tmp_path / "out"), "--operation", "variation", "--image", str(source), "--strength", "0.4"])
    assert status == 0 and (tmp_path / "out" / "ddpm-2-0.png").is_file()
