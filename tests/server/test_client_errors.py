"""ddpm-generate and DDPMClient as a newcomer meets them: a URL without a scheme, a missing or
wrong API key, no server listening. Each failure is one line on stderr and a non-zero exit,
never a traceback; and the WebSocket API key travels as a subprotocol, never in the URL."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from websockets.sync.client import connect
from websockets.sync.server import serve

from server.client import DDPMClient, DDPMConnectionError, DDPMError, key_subprotocol, main as ddpm_generate
from server.client import normalize_url
from tests.server.api.live_server import free_port, run_server

KEY = "client-key-0123456789"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with run_server(tiny_weights, tmp_path_factory.mktemp("logs"), "--api-keys", KEY) as live:
        yield live


def ddpm_generate_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """ddpm-generate as a user runs it (no progress bar suppressed): its exit status, stdout, stderr."""
    env = {name: value for name, value in os.environ.items() if name not in ("DDPM_API_KEY", "DDPM_URL")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "server.client", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_error_line(result: subprocess.CompletedProcess, starts: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(starts), result.stderr
    return lines[0]


# --- the URL --------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    ("localhost:8000", "http://localhost:8000"),
    ("127.0.0.1:8000/", "http://127.0.0.1:8000"),
    ("http://h:1", "http://h:1"),
    ("HTTPS://h:1", "https://h:1"),
    ("ws://h:1", "http://h:1"),
    ("wss://h", "https://h"),
])
def test_normalize_url_assumes_http(given, expected):
    assert normalize_url(given) == expected


@pytest.mark.parametrize("given", ["ftp://h:1", "http://", ""])
def test_normalize_url_refuses_what_is_not_a_server_url(given):
    with pytest.raises(ValueError, match="http://host:port"):
        normalize_url(given)


def test_a_url_without_scheme_works_for_rest_and_stream(server):
    bare = server.url.removeprefix("http://")
    with DDPMClient(bare, api_key=KEY) as client:
        assert client.generate(n=1, steps=2, seed=1)[0].png.startswith(b"\x89PNG")
        assert list(client.stream(n=1, steps=2, seed=1))[-1]["type"] == "done"


def test_ddpm_generate_accepts_a_url_without_scheme(server, tmp_path):
    result = ddpm_generate_process("--url", server.url.removeprefix("http://"), "--api-key", KEY, "--steps", "2",
                                   "--seed", "4", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "ddpm-4-0.png").read_bytes().startswith(b"\x89PNG")


def test_ddpm_generate_refuses_an_unsupported_scheme_in_one_line(tmp_path):
    result = ddpm_generate_process("--url", "ftp://127.0.0.1:1", cwd=tmp_path)
    line = assert_one_error_line(result, "ddpm-generate: error: --url:")
    assert "http://host:port" in line


# --- the API key ----------------------------------------------------------------------------

@pytest.mark.parametrize("key_args", [(), ("--api-key", "wrong")], ids=["missing", "wrong"])
def test_ddpm_generate_without_a_valid_key_says_so_in_one_line(server, tmp_path, key_args):
    result = ddpm_generate_process("--url", server.url, *key_args, "--steps", "2", cwd=tmp_path)
    line = assert_one_error_line(result, "ddpm-generate: error: 401 unauthorized: a valid API key is required")
    assert "websockets" not in line
    assert result.returncode == 1


def test_the_client_reports_401_on_rest_and_stream(server):
    with DDPMClient(server.url, api_key="wrong") as client:
        with pytest.raises(DDPMError) as rest:
            client.generate(steps=2)
        with pytest.raises(DDPMError) as stream:
            list(client.stream(steps=2))
    for refused in (rest.value, stream.value):
        assert (refused.status, refused.code) == (401, "unauthorized")
        assert str(refused).startswith("401 unauthorized: a valid API key is required")


# --- no server ------------------------------------------------------------------------------

def test_ddpm_generate_names_the_url_when_nothing_listens(tmp_path):
    port = free_port()
    for url in (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"):
        result = ddpm_generate_process("--url", url, "--steps", "2", cwd=tmp_path)
        assert_one_error_line(result, f"ddpm-generate: error: cannot connect to http://127.0.0.1:{port}: "
                                      "connection refused")
        assert result.returncode == 1


def test_the_client_names_the_url_when_nothing_listens(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    with DDPMClient(url) as client:
        with pytest.raises(DDPMConnectionError, match=f"^cannot connect to {url}: connection refused$"):
            client.generate(steps=2)
        with pytest.raises(DDPMConnectionError, match=f"^cannot connect to {url}: connection refused$"):
            list(client.stream(steps=2))
    assert ddpm_generate(["--url", url, "--quiet"]) == 1
    assert capsys.readouterr().err == f"ddpm-generate: error: cannot connect to {url}: connection refused\n"


# --- the key as a WebSocket subprotocol ---------------------------------------------------------

def test_stream_offers_the_key_as_a_subprotocol_never_in_the_url():
    """Against a stand-in server that records the handshake and selects "ddpm", as ddpm-serve does."""
    key = "ab?ab>x"  # its base64 has + and / and padding
    seen = {}

    def handler(websocket):
        seen["path"] = websocket.request.path
        seen["offered"] = websocket.request.headers.get("Sec-WebSocket-Protocol")
        seen["authorization"] = websocket.request.headers.get("Authorization")
        seen["selected"] = websocket.subprotocol
        seen["body"] = json.loads(websocket.recv())
        websocket.send(json.dumps({"type": "done", "id": "x", "created": 0, "seed": 1, "data": [], "timings": {}}))

    with serve(handler, "127.0.0.1", 0, subprotocols=["ddpm"]) as stand_in:
        thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
        thread.start()
        port = stand_in.socket.getsockname()[1]
        try:
            with DDPMClient(f"127.0.0.1:{port}", api_key=key) as client:
                events = list(client.stream(n=1, steps=2, seed=1))
        finally:
            stand_in.shutdown()
    encoded = base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()
    assert "-" in encoded and "_" in encoded and "=" not in key_subprotocol(key)
    assert key_subprotocol(key) == "bearer." + encoded
    assert seen["path"] == "/ws/generate"  # no ?token=
    assert seen["offered"] == f"ddpm, bearer.{encoded}"
    assert seen["selected"] == "ddpm"
    assert seen["authorization"] == f"Bearer {key}"  # harmless, and what older servers read
    assert seen["body"]["steps"] == 2 and events[-1]["type"] == "done"


def test_the_server_accepts_the_key_as_a_subprotocol(server):
    """End to end, with no Authorization header: the server selects "ddpm" and runs the request.
    (Needs the server side of subprotocol auth.)"""
    ws_url = server.url.replace("http://", "ws://") + "/ws/generate"
    with connect(ws_url, subprotocols=["ddpm", key_subprotocol(KEY)]) as websocket:
        assert websocket.subprotocol == "ddpm"
        websocket.send(json.dumps({"n": 1, "steps": 2, "seed": 3}))
        events = [json.loads(message) for message in websocket]
    assert events[-1]["type"] == "done"
