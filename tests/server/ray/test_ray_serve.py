"""ddpm-serve on a real local Ray cluster: 2 CPU engine replicas of the tiny model, 2 ingress copies.

One cluster for the module (starting Ray costs tens of seconds on the 2-core CI box); the
autoscaling test runs last and redeploys the application in its place.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'ddpm-serve[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'ddpm-serve[ray]'")
from websockets.sync.client import connect  # noqa: E402

from model.data import to_uint8  # noqa: E402
from server.ray.deploy import APP_NAME, Scaling, application  # noqa: E402
from server.settings import Settings  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout_s: float = 60.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="ddpm-tests")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(settings: Settings, scaling: Scaling) -> None:
    serve.run(application(settings, scaling), name=APP_NAME, route_prefix="/")


@pytest.fixture(scope="module")
def url(cluster, settings):
    deploy(settings, Scaling(min_replicas=2, max_replicas=2, ingress_copies=2, health_check_period_s=1.0))
    wait_for(lambda: len(replicas(cluster)) == 2, what="both replicas on the board")
    return cluster


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/replicas", timeout=10).json()


def decode(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def assert_images_are_the_models(tiny_ddpm, body: dict, steps: int, sampler: str) -> None:
    expected = to_uint8(tiny_ddpm.sample(len(body["data"]), steps=steps, sampler=sampler, seed=body["seed"]))
    got = np.stack([decode(image["b64_json"]) for image in body["data"]])
    np.testing.assert_array_equal(got, expected.squeeze(1).cpu().numpy())


def generate(url: str, **request) -> httpx.Response:
    response = httpx.post(f"{url}/generate", json=request, timeout=120)
    assert response.status_code == 200, response.text
    return response


def stream(url: str, **request) -> list[dict]:
    with connect(url.replace("http", "ws") + "/ws/generate", open_timeout=30) as websocket:
        websocket.send(json.dumps(request))
        events = [json.loads(message) for message in websocket]
    return events


def run_job(url: str, **request) -> dict:
    """The finished job, as GET /jobs/{id} reads it, plus `accepted_by`: the X-DDPM-Replica header
    of its POST /jobs response (None if no replica had accepted it by then)."""
    created = httpx.post(f"{url}/jobs", json=request, timeout=30)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    job = wait_for(lambda: finished(httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()), 120, "the job")
    return {**job, "accepted_by": created.headers.get("x-ddpm-replica")}


def finished(job: dict) -> dict | None:
    return job if job["status"] not in ("queued", "running") else None


def replicas_named(events: list[dict]) -> list[str]:
    """The replicas a WebSocket's `queued` and `started` events name, in order."""
    return [event["replica"] for event in events if event["type"] in ("queued", "started")]


def openai_stream(url: str) -> tuple[str | None, list[str]]:
    """A streamed /v1/images/generations: its X-DDPM-Replica header and its event lines."""
    body = {"steps": 5, "seed": 9, "stream": True, "partial_images": 1}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=120) as response:
        return response.headers.get("x-ddpm-replica"), [line for line in response.iter_lines()
                                                        if line.startswith("event:")]


def test_rest_websocket_and_job_clients_all_finish_with_the_models_images_on_both_replicas(url, tiny_ddpm):
    with ThreadPoolExecutor(8) as pool:
        rest = [pool.submit(generate, url, n=2, steps=20, sampler=sampler, seed=seed)
                for seed in range(4) for sampler in ("ddpm", "ddim")]
        websocket = pool.submit(stream, url, n=1, steps=20, seed=7, preview_every=5)
        job = pool.submit(run_job, url, n=2, steps=20, seed=8)
        for future, sampler in zip(rest, ["ddpm", "ddim"] * 4, strict=True):
            response = future.result()
            assert response.headers["x-ddpm-replica"]
            assert_images_are_the_models(tiny_ddpm, response.json(), 20, sampler)
        events = websocket.result()
        assert [event["type"] for event in events][-1] == "done" and "frame" in {e["type"] for e in events}
        assert_images_are_the_models(tiny_ddpm, events[-1], 20, "ddpm")
        assert job.result()["status"] == "succeeded"
        assert_images_are_the_models(tiny_ddpm, job.result()["result"], 20, "ddpm")
    served = wait_for(lambda: all(r["served"] for r in replicas(url)) and replicas(url), 10, "both replicas served")
    assert sum(replica["served"] for replica in served) == 10
    ids = {replica["id"] for replica in served}
    assert {future.result().headers["x-ddpm-replica"] for future in rest} <= ids
    assert len(set(replicas_named(events))) == 1 and set(replicas_named(events)) <= ids  # WebSocket: queued, started
    assert job.result()["accepted_by"] in ids  # POST /jobs names the replica that accepted the job
    replica, events_sent = openai_stream(url)
    assert replica in ids and events_sent[-1] == "event: image_generation.completed"  # /v1 streams name it too
    metrics = httpx.get(f"{url}/metrics").text
    for replica in served:
        assert f'ddpm_requests_finished_total{{outcome="succeeded",replica="{replica["id"]}"}}' in metrics


def test_a_job_reads_the_same_from_every_ingress_copy(url):
    job = run_job(url, n=1, steps=5, seed=3)
    answers = [httpx.get(f"{url}/jobs/{job['id']}", timeout=10) for _ in range(16)]
    assert len({answer.headers["x-ddpm-ingress"] for answer in answers}) == 2
    assert all(answer.json()["result"] == job["result"] for answer in answers)


def board() -> list[dict]:
    """The replicas' own reports, fresher than an ingress's copy of them."""
    return serve.get_deployment_handle("ReplicaBoard", APP_NAME).snapshot.remote().result()


def test_a_replica_killed_mid_request_loses_nothing_and_is_replaced(url, tiny_ddpm):
    before = {replica["id"] for replica in replicas(url)}
    with ThreadPoolExecutor(6) as pool:
        # Alone at first, so the busy replica is the stream's; at 2 lanes a step, it runs 100 steps.
        websocket = pool.submit(stream, url, n=4, steps=50, seed=21, preview_every=10)
        victim = wait_for(lambda: next((r for r in board() if r["running"]), None), 30, "a busy replica")
        rest = [pool.submit(generate, url, n=2, steps=50, seed=seed) for seed in range(10, 14)]
        os.kill(victim["pid"], signal.SIGKILL)
        events = websocket.result()
        assert "requeued" in [event["type"] for event in events]
        assert_images_are_the_models(tiny_ddpm, events[-1], 50, "ddpm")
        # The stream's queued and started events named the victim, then, after `requeued`, another replica.
        requeued = [event["type"] for event in events].index("requeued")
        first, then = replicas_named(events[:requeued]), replicas_named(events[requeued:])
        assert set(first) == {victim["id"]} and then and victim["id"] not in then
        for future in rest:
            assert_images_are_the_models(tiny_ddpm, future.result().json(), 50, "ddpm")
    after = wait_for(lambda: len(ids := {r["id"] for r in replicas(url)}) == 2 and ids != before and ids, 90,
                     "Ray to replace the killed replica")
    assert victim["id"] not in after


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(url, settings):
    deploy(settings, Scaling(min_replicas=1, max_replicas=2, upscale_delay_s=1.0, downscale_delay_s=3.0))
    wait_for(lambda: len(replicas(url)) == 1, 60, "one replica")
    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(run_job, url, n=4, steps=50, seed=seed) for seed in range(6)]
        wait_for(lambda: len(replicas(url)) == 2, 90, "a second replica under load")
        assert all(job.result()["status"] == "succeeded" for job in jobs)
    wait_for(lambda: len(replicas(url)) == 1, 90, "back to one replica when idle")
