"""API keys: who may call what, who sees which job, per-key limits; CORS."""

from __future__ import annotations

import base64

import pytest
from starlette.testclient import WebSocketDenialResponse

from tests.server.api.conftest import API_KEYS, bearer, serve_fake

ALICE, BOB = API_KEYS
PROTECTED = [("POST", "/generate"), ("POST", "/jobs"), ("GET", "/jobs/x"), ("DELETE", "/jobs/x"),
             ("GET", "/models"), ("GET", "/metrics")]


@pytest.mark.parametrize("method, path", PROTECTED)
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": ALICE}, {"Authorization": "Basic " + ALICE}])
def test_protected_routes_need_a_valid_bearer_key(auth_client, method, path, headers):
    response = auth_client.request(method, path, headers=headers, json={"steps": 1} if method == "POST" else None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/"])
def test_probes_and_page_stay_open(auth_client, path):
    assert auth_client.get(path).status_code == 200


def test_each_configured_key_works(auth_client):
    for key in API_KEYS:
        assert auth_client.post("/generate", json={"steps": 1}, headers=bearer(key)).status_code == 200


def test_a_job_is_visible_only_to_its_key(auth_client):
    job_id = auth_client.post("/jobs", json={"steps": 1}, headers=bearer(ALICE)).json()["id"]
    assert auth_client.get(f"/jobs/{job_id}", headers=bearer(ALICE)).status_code == 200
    assert auth_client.get(f"/jobs/{job_id}", headers=bearer(BOB)).status_code == 404
    assert auth_client.delete(f"/jobs/{job_id}", headers=bearer(BOB)).status_code == 404


def test_per_key_limit_on_open_requests():
    with serve_fake(api_keys=",".join(API_KEYS), max_concurrent_per_key=2) as (client, engine):
        engine.gate.clear()
        for _ in range(2):
            assert client.post("/jobs", json={"steps": 1}, headers=bearer(ALICE)).status_code == 202
        refused = client.post("/jobs", json={"steps": 1}, headers=bearer(ALICE))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
        assert client.post("/jobs", json={"steps": 1}, headers=bearer(BOB)).status_code == 202  # others unaffected
        engine.gate.set()


def key_subprotocols(key: str) -> list[str]:
    return ["ddpm", "bearer." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")]


def test_websocket_takes_the_key_as_header_or_subprotocol(auth_client):
    for headers, subprotocols, selected in [(bearer(ALICE), [], None), ({}, key_subprotocols(BOB), "ddpm")]:
        with auth_client.websocket_connect("/ws/generate", headers=headers, subprotocols=subprotocols) as websocket:
            assert websocket.accepted_subprotocol == selected
            websocket.send_json({"steps": 1})
            assert websocket.receive_json()["type"] == "queued"


@pytest.mark.parametrize("url, subprotocols", [
    ("/ws/generate", []),
    ("/ws/generate", key_subprotocols("wrong")),
    ("/ws/generate", ["ddpm", "bearer.%%%"]),
    (f"/ws/generate?token={ALICE}", []),  # keys never travel in URLs (access logs keep URLs)
])
def test_websocket_without_a_valid_key_is_refused_401(auth_client, url, subprotocols):
    with pytest.raises(WebSocketDenialResponse) as refused:
        with auth_client.websocket_connect(url, subprotocols=subprotocols):
            pass
    assert refused.value.status_code == 401


def test_cors_is_closed_by_default(client):
    response = client.options("/generate", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_configured_origins_only():
    with serve_fake(cors_origins="https://app.example, https://other.example") as (client, _):
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = client.options("/generate", headers={"Origin": "https://app.example", **preflight})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = client.options("/generate", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in refused.headers
