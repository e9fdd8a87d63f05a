"""Jobs through the real app and a fake engine: restarts, attaching, a failing store."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from server.jobs import StoreError, open_repository
from tests.server.api.conftest import serve_fake


def finished(client, job_id: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (view := client.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.01)
    return view


def test_jobs_cut_short_by_a_shutdown_run_after_the_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with serve_fake(jobs_db=url) as (client, engine):
        engine.gate.clear()  # nothing starts before the shutdown
        accepted = [client.post("/jobs", json={"steps": 2, "seed": seed}).json() for seed in (1, 2, 3)]
    with serve_fake(jobs_db=url) as (client, _):
        views = [finished(client, job["id"]) for job in accepted]
        assert client.get("/metrics").text.count("ddpm_jobs_recovered_total 3.0") == 1
    assert [v["status"] for v in views] == ["succeeded"] * 3
    assert [v["result"]["seed"] for v in views] == [1, 2, 3] == [job["seed"] for job in accepted]
    assert all(v["attempts"] == 1 for v in views)  # never started before: no attempt spent


def test_recovered_jobs_wait_for_room_in_the_engine_and_can_be_cancelled_meanwhile(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with serve_fake(jobs_db=url) as (client, engine):
        engine.gate.clear()
        first, second, third = (client.post("/jobs", json={"steps": 2}).json()["id"] for _ in range(3))
    with serve_fake({"max_queue": 1, "paused": True}, jobs_db=url) as (client, engine):
        assert [client.get(f"/jobs/{job_id}").json()["status"] for job_id in (first, second, third)] == ["queued"] * 3
        assert len(engine.handles) == 1  # only the first fits the engine's queue; the others wait their turn
        with client.websocket_connect(f"/ws/jobs/{third}") as websocket:
            assert websocket.receive_json()["type"] == "queued"
            assert client.post(f"/jobs/{third}/cancel").json()["status"] == "cancelled"
            assert websocket.receive_json()["code"] == "cancelled"
        engine.gate.set()
        assert [finished(client, job_id)["status"] for job_id in (first, second)] == ["succeeded"] * 2


def test_a_job_without_a_seed_is_given_one_when_accepted(served):
    client, _ = served
    job = client.post("/jobs", json={"steps": 2}).json()
    assert finished(client, job["id"])["result"]["seed"] == job["seed"]


def test_attaching_follows_a_job_and_detaching_does_not_cancel_it(slow_served):
    client, _ = slow_served
    job_id = client.post("/jobs", json={"steps": 20, "preview_every": 5}).json()["id"]
    with client.websocket_connect(f"/ws/jobs/{job_id}") as websocket:
        first = websocket.receive_json()
        second = websocket.receive_json()
    assert {first["type"], second["type"]} <= {"queued", "started", "progress", "frame"}
    assert first["id"] == second["id"] == job_id
    assert finished(client, job_id)["status"] == "succeeded"  # the socket closed; the job went on
    events = []
    with client.websocket_connect(f"/ws/jobs/{job_id}") as websocket:
        with pytest.raises(WebSocketDisconnect):
            while True:
                events.append(websocket.receive_json())
    assert [e["type"] for e in events] == ["done"] and events[0]["id"] == job_id


def test_attaching_sees_frames_progress_and_the_end(slow_served):
    client, _ = slow_served
    job_id = client.post("/jobs", json={"steps": 10, "preview_every": 2, "preview_kinds": ["x0"]}).json()["id"]
    events = []
    with client.websocket_connect(f"/ws/jobs/{job_id}") as websocket:
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                events.append(websocket.receive_json())
    types = [e["type"] for e in events]
    assert "frame" in types and "progress" in types and types[-1] == "done" and closed.value.code == 1000


def test_attaching_to_an_unknown_job_is_refused_404(client):
    with pytest.raises(WebSocketDenialResponse) as refused:
        with client.websocket_connect("/ws/jobs/nope"):
            pass
    assert refused.value.status_code == 404


class FullDisk:
    """A store whose writes fail, as SQLite's do when the disk is full."""

    durable = True

    def __init__(self, url: str):
        self.store = open_repository(url)

    def add(self, record):
        raise StoreError("database or disk is full")

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_store_that_cannot_write_refuses_the_job_with_503_and_runs_nothing(tmp_path):
    with serve_fake(repository=FullDisk(f"sqlite:///{tmp_path / 'jobs.db'}")) as (client, engine):
        response = client.post("/jobs", json={"steps": 2})
        assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
        assert not engine.handles and client.get("/metrics").status_code == 200


def test_recovered_jobs_hold_their_owners_slots_until_they_end(tmp_path):
    url, key = f"sqlite:///{tmp_path / 'jobs.db'}", "key-alice-0123456789"
    auth = {"Authorization": f"Bearer {key}"}
    with serve_fake(jobs_db=url, api_keys=key, max_concurrent_per_key=2) as (client, engine):
        engine.gate.clear()
        accepted = [client.post("/jobs", json={"steps": 2}, headers=auth).json()["id"] for _ in range(2)]
    with serve_fake({"paused": True}, jobs_db=url, api_keys=key, max_concurrent_per_key=2) as (client, engine):
        assert client.post("/jobs", json={"steps": 2}, headers=auth).status_code == 429
        engine.gate.set()
        for job_id in accepted:
            deadline = time.monotonic() + 10
            while client.get(f"/jobs/{job_id}", headers=auth).json()["status"] != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert client.post("/jobs", json={"steps": 2}, headers=auth).status_code == 202
