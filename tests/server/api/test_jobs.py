"""Jobs: submit, poll, cancel, visibility, and the bounds on what the store keeps."""

from __future__ import annotations

import time

from tests.server.api.conftest import serve_fake


def poll_until_finished(client, job_id: str, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s")


def test_job_runs_to_success_and_keeps_its_result(client):
    created = client.post("/jobs", json={"n": 2, "steps": 3, "seed": 5})
    assert created.status_code == 202
    assert created.json()["status"] in ("queued", "running")
    assert created.headers["location"] == f"/jobs/{created.json()['id']}"
    job = poll_until_finished(client, created.json()["id"])
    assert job["status"] == "succeeded"
    assert (job["step"], job["total"], job["queue_position"]) == (3, 3, None)
    assert [image["seed"] for image in job["result"]["data"]] == [5000, 5001]
    assert client.get(f"/jobs/{job['id']}").json() == job  # readable again


def test_queued_job_reports_its_position_and_can_be_cancelled(served):
    client, engine = served
    engine.gate.clear()
    job_id = client.post("/jobs", json={"steps": 3}).json()["id"]
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "queued" and view["queue_position"] == 0
    cancelled = client.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    engine.gate.set()
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["error"]["code"] == "cancelled" and job["result"] is None


def test_running_job_shows_progress_then_cancels(slow_served):
    client, engine = slow_served
    job_id = client.post("/jobs", json={"steps": 50}).json()["id"]
    deadline = time.monotonic() + 5
    while (view := client.get(f"/jobs/{job_id}").json())["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert view["status"] == "running" and view["total"] == 50
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"  # no stale "running" after a cancel


def test_delete_cancels_and_forgets_a_job(slow_served):
    client, _ = slow_served
    running = client.post("/jobs", json={"steps": 50}).json()["id"]
    finished = client.post("/jobs", json={"steps": 1}).json()["id"]
    poll_until_finished(client, finished)
    assert client.delete(f"/jobs/{running}").json()["status"] == "cancelled"
    assert client.delete(f"/jobs/{finished}").json()["status"] == "succeeded"
    for job_id in (running, finished):
        assert client.get(f"/jobs/{job_id}").status_code == 404
        assert client.delete(f"/jobs/{job_id}").status_code == 404


def test_unknown_job_is_404(client):
    for method, path in (("GET", "/jobs/does-not-exist"), ("DELETE", "/jobs/does-not-exist"),
                         ("POST", "/jobs/does-not-exist/cancel")):
        response = client.request(method, path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_finished_jobs_expire_after_the_ttl():
    with serve_fake(job_ttl_s=1.0) as (client, _):
        job_id = client.post("/jobs", json={"steps": 1}).json()["id"]
        poll_until_finished(client, job_id)
        time.sleep(1.1)
        assert client.get(f"/jobs/{job_id}").status_code == 404


def test_unfinished_jobs_are_bounded_and_finished_ones_do_not_count():
    with serve_fake(max_jobs=2) as (client, engine):
        first = client.post("/jobs", json={"steps": 1}).json()["id"]
        poll_until_finished(client, first)
        engine.gate.clear()
        client.post("/jobs", json={"steps": 1})
        client.post("/jobs", json={"steps": 1})
        assert client.get(f"/jobs/{first}").status_code == 200  # finished: kept for the TTL
        refused = client.post("/jobs", json={"steps": 1})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
        assert "retry-after" in refused.headers
        engine.gate.set()
