"""WS /ws/generate against a fake engine: the event protocol, cancel, and protocol violations."""

from __future__ import annotations

import base64
import time

import pytest
from starlette.websockets import WebSocketDisconnect

from tests.server.api.conftest import serve_fake


def receive_all(websocket) -> tuple[list[dict], int]:
    """Every event until the server closes, and the close code."""
    events = []
    while True:
        try:
            events.append(websocket.receive_json())
        except WebSocketDisconnect as closed:
            return events, closed.code


def test_stream_sends_queued_started_progress_frames_done(client):
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_json({"n": 2, "steps": 4, "seed": 3, "preview_every": 2, "preview_kinds": ["x0"]})
        events, code = receive_all(websocket)
    assert code == 1000
    types = [event["type"] for event in events]
    assert types[:2] == ["queued", "started"] and types[-1] == "done"
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4]
    frames = [e for e in events if e["type"] == "frame"]
    assert [(f["step"], f["index"], f["kind"]) for f in frames] == [(2, 0, "x0"), (2, 1, "x0"), (4, 0, "x0"), (4, 1, "x0")]
    assert base64.b64decode(frames[0]["png"]).startswith(b"\x89PNG")
    done = events[-1]
    assert done["seed"] == 3 and [image["seed"] for image in done["data"]] == [3000, 3001]


def test_no_frames_unless_asked(client):
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_json({"steps": 3, "type": "generate"})
        events, _ = receive_all(websocket)
    assert not [e for e in events if e["type"] == "frame"]


def test_server_default_preview_cadence_applies_when_absent():
    with serve_fake(default_preview_every=1) as (client, _):
        with client.websocket_connect("/ws/generate") as websocket:
            websocket.send_json({"steps": 2, "preview_kinds": ["x_t"]})
            events, _ = receive_all(websocket)
    assert [e["step"] for e in events if e["type"] == "frame"] == [1, 2]


def test_cancel_message_ends_the_stream_with_a_cancelled_error(slow_served):
    client, engine = slow_served
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_json({"steps": 50})
        while websocket.receive_json()["type"] != "progress":
            pass
        websocket.send_json({"type": "cancel"})
        events, code = receive_all(websocket)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"
    assert code == 1000


def test_closing_the_socket_cancels_the_request(slow_served):
    client, engine = slow_served
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_json({"steps": 50})
        request_id = websocket.receive_json()["id"]
        handle = engine.handles[request_id]
    # leaving the block closed the socket; the server cancels at once
    deadline = time.monotonic() + 5
    while not handle.cancelled:
        assert time.monotonic() < deadline, "request still running after the client left"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "message, expected",
    [
        ("not json", "JSON"),
        ("[1, 2]", "object"),
        ('{"n": 0}', "n"),
        ('{"steps": 51}', "steps must be between 1 and 50"),
        ('{"sampler": "plms"}', "sampler"),
        ('{"preview_every": -1}', "preview_every"),
        ('{"preview_kinds": ["noise"]}', "preview_kinds"),
        ('{"type": "cancel"}', "type"),
        ('{"seed": "1"}', "seed"),
        ('{"extra": 1}', "extra"),
    ],
)
def test_malformed_first_message_is_an_error_event_and_1008(client, message, expected):
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_text(message)
        events, code = receive_all(websocket)
    assert code == 1008
    assert len(events) == 1 and events[0]["type"] == "error"
    assert expected.lower() in events[0]["message"].lower()


def test_binary_and_oversized_messages_are_refused(client):
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_bytes(b'{"n": 1}')
        events, code = receive_all(websocket)
    assert code == 1008 and "binary" in events[0]["message"]
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_text('{"n": 1, "x": "' + "y" * 20_000 + '"}')
        events, code = receive_all(websocket)
    assert code == 1008 and "limit" in events[0]["message"]


def test_bad_message_mid_stream_cancels_and_closes_1008(slow_served):
    client, engine = slow_served
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_json({"steps": 50})
        request_id = websocket.receive_json()["id"]
        handle = engine.handles[request_id]
        websocket.send_json({"type": "pause"})
        events, code = receive_all(websocket)
    assert code == 1008
    assert events[-1]["type"] == "error" and events[-1]["code"] == "invalid_request"
    assert handle.cancelled


def test_full_queue_is_an_error_event_and_try_again_later():
    with serve_fake({"max_queue": 1}) as (client, engine):
        engine.gate.clear()
        client.post("/jobs", json={"steps": 1})
        with client.websocket_connect("/ws/generate") as websocket:
            websocket.send_json({"steps": 1})
            events, code = receive_all(websocket)
        engine.gate.set()
    message = events[0]["message"]
    assert code == 1013 and events == [{"type": "error", "id": None, "code": "queue_full", "message": message}]


def test_other_clients_keep_being_served_after_a_bad_one(client):
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_text("{{{")
        receive_all(websocket)
    assert client.post("/generate", json={"steps": 1}).status_code == 200


def test_the_done_event_is_the_http_response_body(client):
    """One event, one JSON shape: the WebSocket's done is what POST /generate returns."""
    body = client.post("/generate", json={"n": 2, "steps": 2, "seed": 3}).json()
    with client.websocket_connect("/ws/generate") as websocket:
        websocket.send_json({"n": 2, "steps": 2, "seed": 3})
        events, _ = receive_all(websocket)
    done = events[-1]
    assert done.keys() == body.keys() >= {"type", "id", "created", "seed", "data", "timings"}
    assert done["type"] == body["type"] == "done" and done["data"] == body["data"]
