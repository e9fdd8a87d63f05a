"""Run `ddpm-serve` as a real subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def run_server(weights: Path, log_dir: Path, *flags: str, env: dict[str, str] | None = None,
               start_timeout_s: float = 120.0) -> Iterator[LiveServer]:
    """Start ddpm-serve, wait for /readyz, yield it; SIGTERM it on the way out."""
    port = free_port()
    log = log_dir / f"ddpm-serve-{port}.log"
    # --device cpu: the tests compare with references computed on the CPU, and "auto" would serve
    # on a GPU where there is one (a flag in `flags` comes later and wins).
    command = [sys.executable, "-m", "server.cli", "--weights", str(weights), "--port", str(port), "--device", "cpu",
               "--log-level", "warning", "--state-dir", str(log_dir / f"state-{port}"), *flags]
    # One torch thread: on a small shared CPU, two threads spinning against each other are 10x slower.
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env,
                                   cwd=Path(__file__).resolve().parents[3])
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_ready(server, start_timeout_s)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_ready(server: LiveServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"ddpm-serve exited with {server.process.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"ddpm-serve not ready after {timeout_s}s:\n{server.output()}")
