"""Hypothesis fuzz of every body the API parses: nothing a client sends gives a 5xx or a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect

from server.api.schemas import StreamRequest
from tests.server.api.conftest import serve_fake

FIELDS = sorted(StreamRequest.model_fields)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
# Mostly near-valid objects (known fields, plausible and implausible values), sometimes anything at all.
plausible = {
    "n": st.integers(-2, 20), "steps": st.integers(-2, 60), "sampler": st.sampled_from(["ddpm", "ddim", "x"]),
    "eta": st.floats(-1, 2), "seed": st.integers(-1, 2**64), "preview_every": st.integers(-1, 60),
    "preview_kinds": st.lists(st.sampled_from(["x_t", "x0", "z"]), max_size=3),
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={name: plausible.get(name, json_values) | json_values for name in FIELDS}),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=4),
    json_values,
)
fuzz = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def served():
    with serve_fake() as pair:
        yield pair


@pytest.mark.parametrize("route", ["/generate", "/jobs"])
@fuzz
@given(body=bodies)
def test_http_bodies_never_give_5xx(served, route, body):
    client, _ = served
    response = client.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 202, 413, 422), response.text
    if response.status_code == 422:
        assert response.json()["error"]["message"]


@fuzz
@given(body=bodies)
def test_websocket_messages_never_crash(served, body):
    client, _ = served
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_text(json.dumps(body))
        events = []
        while True:
            try:
                events.append(websocket.receive_json())
            except WebSocketDisconnect as closed:
                close_code = closed.code
                break
    assert events[-1]["type"] in ("done", "error")
    assert close_code == (1008 if events[-1]["type"] == "error" else 1000)


def test_server_still_serves_after_the_fuzz(served):
    client, _ = served
    assert client.post("/generate", json={"steps": 1}).status_code == 200
