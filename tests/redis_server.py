"""A real `redis-server` on a free loopback port, for the Redis job store's tests (no fakes).

`redis_server` is a session-scoped pytest fixture, available to every test (tests/conftest.py
loads this module as a plugin); it
skips, with the reason, when redis-server is not installed (`.ci/run` installs it) or the
`redis` package is missing. Tests share it by giving each store its own key prefix
(`server.url_for(...)`). `RedisServer` alone starts private servers: with a password, with
persistence, or to stop one under a store.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

SKIP_WITHOUT = "redis-server is not installed (apt-get install redis-server; .ci/run does it)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server process; `persistent` keeps an append-only file in `directory`,
    fsynced at every write, so that a restart (even after kill -9) finds every record."""

    def __init__(self, directory: Path, *, password: str | None = None, persistent: bool = False):
        self.directory, self.password, self.persistent = directory, password, persistent
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def url_for(self, name: str = "test") -> str:
        """The URL with a key prefix of its own: stores opened with it see no one else's keys."""
        return f"{self.url}?prefix={name}-{uuid.uuid4().hex[:8]}:"

    def start(self) -> "RedisServer":
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--daemonize", "no", "--dir", str(self.directory), *persistence]
        if self.password:
            command += ["--requirepass", self.password]
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {self.log()}")
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.directory.glob("redis-*.log"))

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def require_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip(SKIP_WITHOUT)
    pytest.importorskip("redis", reason="the redis package is missing: pip install -e '.[dev]'")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    require_redis()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
