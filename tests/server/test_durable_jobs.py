"""Accepted jobs survive `kill -9`: real `ddpm-serve` processes on one SQLite store (or one real
Redis, tests/redis_server.py), the real engine, images compared with DDPM.sample for each job's seed."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import model
from model.data import to_uint8
from server.settings import SHIPPED_WEIGHTS
from tests.server.api.live_server import free_port, run_server

# Killed by the sitecustomize below whenever a batch holds a lane of this seed.
KILLER_SEED = 666
SITECUSTOMIZE = f"""
import os, signal
from server.engine import runner
step = runner.Runner.step
def deadly_step(self, lanes):
    if any(lane.request.seed == {KILLER_SEED} for lane in lanes):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, lanes)
runner.Runner.step = deadly_step
"""


def post_job(url: str, **body) -> dict:
    response = httpx.post(url + "/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()


def wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def pixels(view: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))))
                     for image in view["result"]["data"]])


@pytest.fixture(params=["sqlite", "redis"])
def store_flags(request, tmp_path) -> tuple[str, ...]:
    """The job store both servers share: the default SQLite file in the state dir, or one Redis."""
    if request.param == "sqlite":
        return ("--state-dir", str(tmp_path / "state"))
    return ("--jobs-db", request.getfixturevalue("redis_server").url_for("kill9"))


def test_kill_9_loses_nothing_and_the_rerun_gives_the_same_images(tmp_path, store_flags):
    state = (*store_flags, "--max-batch", "1", "--worker-id", "the-server")  # a restart under one name
    with run_server(SHIPPED_WEIGHTS, tmp_path, *state) as server:
        finished = post_job(server.url, steps=5, sampler="ddim", seed=1)
        wait_for(lambda: job(server.url, finished["id"])["status"] == "succeeded")
        cancelled = post_job(server.url, steps=1000, seed=2)
        assert httpx.post(f"{server.url}/jobs/{cancelled['id']}/cancel", timeout=30).json()["status"] == "cancelled"
        requests = [dict(n=2, steps=150, sampler="ddpm", seed=3),  # running at the kill
                    dict(n=1, steps=30, sampler="ddpm", seed=4), dict(n=1, steps=30, sampler="ddim", seed=5),
                    dict(n=1, steps=20, sampler="ddim")]  # no seed: drawn at acceptance
        accepted = [post_job(server.url, **request) for request in requests]
        wait_for(lambda: job(server.url, accepted[0]["id"])["step"] >= 20)
        before = job(server.url, finished["id"])
        server.process.kill()  # SIGKILL: no drain, no goodbye
        server.process.wait()
    with run_server(SHIPPED_WEIGHTS, tmp_path, *state) as server:
        assert job(server.url, finished["id"]) == before
        assert job(server.url, cancelled["id"])["status"] == "cancelled"
        wait_for(lambda: all(job(server.url, j["id"])["status"] == "succeeded" for j in accepted))
        views = [job(server.url, j["id"]) for j in accepted]
    assert [v["attempts"] for v in views] == [2, 1, 1, 1]
    ddpm = model.load(SHIPPED_WEIGHTS)
    for request, created, view in zip(requests, accepted, views, strict=True):
        expected = ddpm.sample(request["n"], steps=request["steps"], sampler=request["sampler"], seed=created["seed"])
        difference = np.abs(pixels(view).astype(int) - to_uint8(expected).squeeze(1).numpy().astype(int))
        assert difference.max() <= 1, f"job {request}: not the images of its seed"


def test_a_job_interrupted_more_than_its_attempts_ends_failed(tmp_path):
    state = ("--state-dir", str(tmp_path / "state"), "--worker-id", "the-server")
    with run_server(SHIPPED_WEIGHTS, tmp_path, *state) as server:
        doomed = post_job(server.url, steps=1000, seed=9)
        wait_for(lambda: job(server.url, doomed["id"])["status"] == "running")
        server.process.kill()
        server.process.wait()
    with run_server(SHIPPED_WEIGHTS, tmp_path, *state, "--job-max-attempts", "1") as server:
        view = job(server.url, doomed["id"])
    assert view["status"] == "failed" and view["error"]["code"] == "interrupted"
    assert "interrupted 1 times" in view["error"]["message"]


def test_two_servers_on_one_store_never_run_a_job_twice_and_one_takes_over_from_the_other(tmp_path):
    store = ("--jobs-db", f"sqlite:///{tmp_path / 'jobs.db'}", "--job-lease-s", "2")
    with run_server(SHIPPED_WEIGHTS, tmp_path, *store, "--worker-id", "a") as first:
        long = post_job(first.url, steps=400, seed=11)  # ~4 s at 10 ms a step
        wait_for(lambda: job(first.url, long["id"])["status"] == "running")
        with run_server(SHIPPED_WEIGHTS, tmp_path, *store, "--worker-id", "b") as second:
            time.sleep(3)  # more than a lease: b sweeps, and must leave a's live job alone
            assert metric(second.url, "ddpm_images_submitted_total") == 0
            first.process.kill()  # a dies mid-run; its lease runs out; b takes the job over
            first.process.wait()
            wait_for(lambda: job(second.url, long["id"])["status"] == "succeeded")
            view = job(second.url, long["id"])
            assert metric(second.url, "ddpm_jobs_recovered_total") == 1
    assert view["attempts"] == 2
    expected = model.load(SHIPPED_WEIGHTS).sample(1, steps=400, seed=11)
    assert np.abs(pixels(view).astype(int) - to_uint8(expected).squeeze(1).numpy().astype(int)).max() <= 1


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_a_job_that_kills_its_worker_fails_after_its_attempts_and_the_others_run(tiny_weights, tmp_path):
    """A crash loop: the worker dies at the job's first step; a supervisor restarts it each time."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "server.cli", "--weights", str(tiny_weights), "--port", str(port),
               "--state-dir", str(tmp_path / "state"), "--log-level", "warning"]
    deaths = 0
    with (tmp_path / "serve.log").open("wb") as log:
        for life in range(6):
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       cwd=Path(__file__).resolve().parents[2])
            if life == 0:
                wait_for(lambda: ready(url))
                before = post_job(url, steps=10, sampler="ddim", seed=1)
                wait_for(lambda: job(url, before["id"])["status"] == "succeeded")
                killer = post_job(url, steps=10, sampler="ddim", seed=KILLER_SEED)
            wait_for(lambda: process.poll() is not None or (ready(url) and job(url, killer["id"])["status"] == "failed"))
            if process.poll() is None:
                break  # alive: the killer is no longer run
            assert process.returncode == -signal.SIGKILL
            deaths += 1
        try:
            failed = job(url, killer["id"])
            after = post_job(url, steps=10, sampler="ddim", seed=2)
            wait_for(lambda: job(url, after["id"])["status"] == "succeeded")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert deaths == 3  # --job-max-attempts 3: three runs started, each killed the worker
    assert failed["status"] == "failed" and failed["error"]["code"] == "interrupted" and failed["attempts"] == 3
    assert "interrupted 3 times" in failed["error"]["message"]


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
