"""End to end in process: the real app around the real engine and the tiny model (T=50)."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model.data import to_uint8
from server.app import create_app
from server.settings import Settings


@pytest.fixture(scope="module")
def client(tiny_weights):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is far faster than two contending
    # The device and dtype of the reference (tiny_ddpm: CPU, float32), not "auto": on a CUDA host
    # auto serves on the GPU, whose images differ from the CPU's in the last bits.
    settings = Settings(weights=tiny_weights, device="cpu", dtype="float32", max_batch=8, max_images_per_request=4,
                        jobs_db="memory://")
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    torch.set_num_threads(threads)


def decode(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def expected_images(ddpm, n: int, steps: int, sampler: str, seed: int) -> np.ndarray:
    """What DDPM.sample gives for the same request, as the uint8 grayscale the server encodes."""
    return to_uint8(ddpm.sample(n, steps=steps, sampler=sampler, seed=seed)).squeeze(1).cpu().numpy()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_matches_ddpm_sample_for_the_same_seed(client, tiny_ddpm, sampler):
    response = client.post("/generate", json={"n": 2, "steps": 10, "sampler": sampler, "seed": 11})
    assert response.status_code == 200, response.text
    got = np.stack([decode(item["b64_json"]) for item in response.json()["data"]])
    assert got.shape == (2, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected_images(tiny_ddpm, 2, 10, sampler, 11))


def test_png_response(client):
    response = client.post("/generate", json={"steps": 3, "seed": 1}, headers={"Accept": "image/png"})
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (28, 28)


def test_stream_sends_frames_then_the_final_images(client):
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_json({"n": 2, "steps": 6, "seed": 4, "sampler": "ddim", "preview_every": 3})
        events = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(websocket.receive_json())
    types = [event["type"] for event in events]
    assert types[0] == "queued" and "started" in types and types[-1] == "done"
    frames = [e for e in events if e["type"] == "frame"]
    assert {(f["index"], f["kind"]) for f in frames} == {(0, "x_t"), (0, "x0"), (1, "x_t"), (1, "x0")}
    assert all(decode(f["png"]).shape == (28, 28) for f in frames)
    assert [image["index"] for image in events[-1]["data"]] == [0, 1]


def test_job_lifecycle_with_concurrent_requests(client, tiny_ddpm):
    ids = [client.post("/jobs", json={"n": 2, "steps": 5, "seed": seed}).json()["id"] for seed in (1, 2, 3)]
    deadline = time.monotonic() + 120
    jobs = {}
    while len(jobs) < len(ids):
        assert time.monotonic() < deadline
        for job_id in ids:
            view = client.get(f"/jobs/{job_id}").json()
            if view["status"] not in ("queued", "running"):
                jobs[job_id] = view
        time.sleep(0.05)
    assert [jobs[i]["status"] for i in ids] == ["succeeded"] * 3
    # Batched beside the others, each request still gives exactly its lone images.
    got = np.stack([decode(item["b64_json"]) for item in jobs[ids[1]]["result"]["data"]])
    np.testing.assert_array_equal(got, expected_images(tiny_ddpm, 2, 5, "ddpm", 2))


def test_cancelling_a_job(client):
    job_id = client.post("/jobs", json={"n": 4, "steps": 50}).json()["id"]
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"


def test_model_description(client, tiny_ddpm):
    body = client.get("/models").json()
    assert body["num_parameters"] == tiny_ddpm.num_parameters()
    assert body["image_shape"] == [1, 28, 28] and body["num_timesteps"] == 50
    assert body["limits"]["max_images_per_request"] == 4


def test_steps_over_T_is_422_naming_T(client):
    response = client.post("/generate", json={"steps": 51})
    assert response.status_code == 422 and "50" in response.json()["error"]["message"]
