"""`ddpm-serve` as a real process on a loopback port: real HTTP and WebSocket, the Python client,
ddpm-generate, disconnect-cancels, and a graceful SIGTERM."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.client import DDPMClient, DDPMError, main as ddpm_generate
from tests.server.api.live_server import run_server

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with run_server(tiny_weights, tmp_path_factory.mktemp("logs"), "--max-batch", "8", "--api-keys", KEY) as live:
        yield live


@pytest.fixture
def client(server):
    with DDPMClient(server.url, api_key=KEY) as client:
        yield client


def metric(server, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_client_generate_is_reproducible(client):
    first = client.generate(n=2, steps=5, sampler="ddim", seed=3)
    again = client.generate(n=1, steps=5, sampler="ddim", seed=3)
    assert [image.index for image in first] == [0, 1]
    assert again[0].png == first[0].png and again[0].seed == first[0].seed


def test_client_stream_and_jobs(client):
    events = list(client.stream(n=1, steps=4, seed=2, preview_every=2, preview_kinds=("x0",)))
    assert events[0]["type"] == "queued" and events[-1]["type"] == "done"
    frame_steps = [e["step"] for e in events if e["type"] == "frame"]
    assert frame_steps and set(frame_steps) <= {2, 4}  # max_preview_fps may skip some
    job = client.submit_job(n=1, steps=4, seed=2)
    assert client.wait_job(job["id"], poll_s=0.05)[0].png == client.generate(n=1, steps=4, seed=2)[0].png


def test_client_reports_server_errors(server, client):
    with pytest.raises(DDPMError) as refused:
        client.generate(steps=10_000)
    assert refused.value.status == 422 and "steps" in refused.value.message
    with pytest.raises(DDPMError) as unauthorized:
        DDPMClient(server.url, api_key="wrong").models()
    assert unauthorized.value.status == 401
    with pytest.raises(DDPMError, match="steps"):
        list(client.stream(steps=0))


def test_ddpm_generate_saves_pngs(server, tmp_path, capsys):
    status = ddpm_generate(["--url", server.url, "--api-key", KEY, "-n", "2", "--steps", "3", "--seed", "9",
                            "-o", str(tmp_path), "--quiet"])
    assert status == 0
    paths = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in paths] == ["ddpm-9-0.png", "ddpm-9-1.png"]
    assert Image.open(paths[0]).size == (28, 28)
    assert str(paths[0]) in capsys.readouterr().out


def test_a_client_that_disconnects_cancels_its_request(server):
    before = metric(server, "ddpm_requests_finished_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json={"n": 4, "steps": 50},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    deadline = time.monotonic() + 60
    while metric(server, "ddpm_requests_finished_total", outcome="cancelled") <= before:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.1)


def test_sigterm_finishes_running_work_then_exits_cleanly(tiny_weights, tmp_path):
    with run_server(tiny_weights, tmp_path, "--shutdown-grace-s", "60") as server:
        outcome = {}

        def generate() -> None:
            outcome["response"] = httpx.post(server.url + "/generate", json={"n": 2, "steps": 20}, timeout=120)

        worker = threading.Thread(target=generate)
        worker.start()
        deadline = time.monotonic() + 60
        while metric(server, "ddpm_batch_size_count") < 1:  # wait until it is running
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        # uvicorn re-raises the signal once its graceful shutdown is over, as supervisors expect
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert outcome["response"].status_code == 200
    assert len(outcome["response"].json()["data"]) == 2
    assert "Traceback" not in server.output()
