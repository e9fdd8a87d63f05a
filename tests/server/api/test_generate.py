"""POST /generate against a fake engine: shapes, content negotiation, every bad input, overload."""

from __future__ import annotations

import base64
import json

import pytest

from tests.server.api.conftest import serve_fake

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_returns_openai_shaped_images_with_seeds(client):
    response = client.post("/generate", json={"n": 3, "steps": 5, "sampler": "ddim", "seed": 7})
    assert response.status_code == 200
    body = response.json()
    assert body["seed"] == 7 and isinstance(body["created"], int)
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert [item["seed"] for item in body["data"]] == [7000, 7001, 7002]  # the fake's per-image seeds
    assert all(base64.b64decode(item["b64_json"]).startswith(PNG_MAGIC) for item in body["data"])
    assert set(body["timings"]) == {"queue_s", "run_s", "total_s"}


def test_defaults_are_one_image_and_the_models_T(served):
    client, engine = served
    body = client.post("/generate", json={}).json()
    assert len(body["data"]) == 1 and engine.submitted[-1].steps == 50


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("dpmpp_2m", 20), ("unipc", 20), ("dpmpp_2m_sde", 50)])
def test_the_solvers_default_to_their_own_few_steps(served, sampler, steps):
    client, engine = served
    assert client.post("/generate", json={"sampler": sampler}).status_code == 200
    assert engine.submitted[-1].steps == steps


def test_accept_png_returns_the_bytes(client):
    response = client.post("/generate", json={"steps": 2, "seed": 1}, headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(PNG_MAGIC)
    assert response.headers["x-seed"] == "1000"


def test_accept_png_with_several_images_is_not_acceptable(client):
    response = client.post("/generate", json={"n": 2, "steps": 2}, headers={"Accept": "image/png"})
    assert response.status_code == 406
    assert "n=1" in response.json()["error"]["message"]


def test_accept_png_and_json_prefers_json(client):
    response = client.post("/generate", json={"n": 2, "steps": 2}, headers={"Accept": "image/png, application/json"})
    assert response.status_code == 200 and len(response.json()["data"]) == 2


BAD_BODIES = [
    ({"n": 0}, "n"),
    ({"n": 17}, "n must be between 1 and 16"),
    ({"n": 2.5}, "n"),
    ({"n": "2"}, "n"),
    ({"n": True}, "n"),
    ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps must be between 1 and 50"),
    ({"steps": "ten"}, "steps"),
    ({"sampler": "euler"}, "sampler"),
    ({"eta": 1.5}, "eta"),
    ({"eta": -0.1}, "eta"),
    ({"eta": "0.5"}, "eta"),
    ({"seed": "42"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"response_format": "url"}, "response_format"),
    ({"prompt": "a cat"}, "prompt: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("body, names", BAD_BODIES, ids=[json.dumps(b) for b, _ in BAD_BODIES])
@pytest.mark.parametrize("route", ["/generate", "/jobs"])
def test_bad_fields_are_422_naming_the_field(client, route, body, names):
    check_bad_field(client, route, body, names)


def test_previews_are_for_websockets_and_jobs_not_for_generate(client):
    check_bad_field(client, "/generate", {"preview_every": 5}, "preview_every")


def check_bad_field(client, route, body, names):
    response = client.post(route, json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert names in error["message"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "body"),
        (b'"n"', "body"),
        (b'{"eta": NaN}', "eta"),
        (b'{"eta": Infinity}', "eta"),
        (b"", "body"),
    ],
)
def test_malformed_bodies_are_422(client, raw, expected):
    response = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert expected.lower() in response.json()["error"]["message"].lower()


def test_oversized_body_is_413(client):
    response = client.post("/generate", json={"n": 1, "pad": "x" * 20_000})
    assert response.status_code == 413
    assert "16384" in response.json()["error"]["message"]


def test_oversized_chunked_body_is_413(client):
    chunks = (b'{"n": 1, "pad": "' + b"x" * 5000 for _ in range(5))  # no Content-Length
    response = client.post("/generate", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


def test_a_body_that_is_not_utf8_is_422_like_any_bad_json(client):
    response = client.post("/generate", content=b'{"n": "\xff"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_full_queue_is_429_with_retry_after():
    with serve_fake({"max_queue": 4}) as (client, engine):
        engine.gate.clear()  # nothing starts: everything stays queued
        assert client.post("/jobs", json={"n": 4, "steps": 2}).status_code == 202
        response = client.post("/generate", json={"n": 1, "steps": 2})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "3"  # ceil of the engine's 2.5 s
        assert response.json()["error"]["code"] == "queue_full"
        engine.gate.set()


def test_shutting_down_is_503(served):
    client, engine = served
    engine.closing = True
    response = client.post("/generate", json={"steps": 2})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutdown"
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    response = client.get("/generate")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_405_names_every_method_the_path_serves(client):
    for method in ("OPTIONS", "PUT"):
        response = client.request(method, "/jobs/some-id")
        assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET, HEAD"
