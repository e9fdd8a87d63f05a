"""`ddpm-serve` as a real process on a loopback port: real HTTP and WebSocket, the Python client,
ddpm-generate, disconnect-cancels, and a graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from server.client import DDPMClient, DDPMError, main as ddpm_generate
from server.settings import SHIPPED_WEIGHTS
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
        assert server.process.wait(timeout=60) == 0
    assert outcome["response"].status_code == 200
    assert len(outcome["response"].json()["data"]) == 2
    assert "Traceback" not in server.output()


def test_sigterm_refuses_queued_work_and_ends_running_work_after_one_grace_period(tmp_path):
    """One grace period for everything: /readyz 503 at once, the queued request 503 `shutdown`
    at once, the running WebSocket an error event and a 1001 close when the grace is over, exit 0."""
    grace_s = 2.0
    with run_server(SHIPPED_WEIGHTS, tmp_path, "--shutdown-grace-s", str(grace_s), "--max-batch", "1") as server:
        with connect(server.url.replace("http", "ws") + "/ws/generate") as websocket:
            websocket.send(json.dumps({"n": 1, "steps": 1000, "seed": 1}))  # ~10 s on this CPU
            assert [json.loads(websocket.recv())["type"] for _ in range(2)] == ["queued", "started"]
            outcome = {}
            queued = threading.Thread(target=lambda: outcome.update(
                response=httpx.post(server.url + "/generate", json={"steps": 1000}, timeout=60)))
            queued.start()
            wait_for(lambda: metric(server, "ddpm_images_submitted_total") == 2)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            ready = httpx.get(server.url + "/readyz", timeout=5)
            queued.join(timeout=10)
            refused_after_s = time.monotonic() - signalled
            events = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    events.append(json.loads(websocket.recv(timeout=30)))
            ended_after_s = time.monotonic() - signalled
        status = server.process.wait(timeout=30)
        exited_after_s = time.monotonic() - signalled
    assert ready.status_code == 503
    assert outcome["response"].status_code == 503 and outcome["response"].json()["error"]["code"] == "shutdown"
    assert refused_after_s < grace_s
    assert events[-1]["type"] == "error" and events[-1]["code"] == "shutdown"
    assert closed.value.rcvd.code == 1001
    assert grace_s <= ended_after_s < grace_s + 3
    assert status == 0 and exited_after_s < grace_s + 8
    assert "Traceback" not in server.output()


def wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_the_log_names_the_model_and_keeps_urls_without_queries(tiny_weights, tmp_path):
    with run_server(tiny_weights, tmp_path, "--log-level", "info") as server:
        assert httpx.get(server.url + "/readyz?token=secret-in-the-url").status_code == 200
        output = server.output()
    assert "serving " in output and "T=50" in output and "on cpu in float32 with 1 torch threads" in output
    assert '"GET /readyz HTTP/1.1" 200' in output and "secret-in-the-url" not in output


def test_a_websocket_client_that_stops_reading_is_cancelled_and_dropped(tmp_path):
    with run_server(SHIPPED_WEIGHTS, tmp_path, "--ws-send-timeout-s", "2", "--max-preview-fps", "50") as server:
        host, port = server.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's kernel buffers little
        sock.connect((host, int(port)))
        # max_queue=1: the client's library stops reading the socket once one message waits unread
        with connect(server.url.replace("http", "ws") + "/ws/generate", sock=sock, max_queue=1,
                     close_timeout=1) as websocket:
            websocket.send(json.dumps({"n": 16, "steps": 1000, "preview_every": 1}))
            began = time.monotonic()
            wait_for(lambda: metric(server, "ddpm_requests_finished_total", outcome="cancelled") == 1, timeout_s=30)
            dropped_after_s = time.monotonic() - began
            wait_for(lambda: metric(server, "ddpm_websockets_open") == 0, timeout_s=30)
    assert dropped_after_s < 10  # the request alone would take minutes
    assert "dropping a WebSocket client: the client read nothing for 2s" in server.output()
