"""ddpm-serve: load the weights, then serve the API with uvicorn.

Every Settings field is a flag (--max-batch 16) and an environment variable (DDPM_MAX_BATCH=16);
flags win. The weights are loaded before uvicorn starts, so a missing or corrupt file ends the
process with one line on stderr and exit status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import socket
import sys
import typing
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from server.api.errors import describe_validation_errors
from server.app import StartupError, create_app, drain, load_model, real_engine_factory, reserve_cores_for_engine
from model.threads import sleep_idle_threads
from server.http import GuardedH11Protocol
from server.jobs import StoreError, open_repository
from server.settings import Settings

# After the engine has drained, what uvicorn waits for: responses already decided being written.
FLUSH_TIMEOUT_S = 5
SEND_BUFFER_BYTES = 128 * 1024  # per connection: enough for a few responses' worth in flight


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm-serve",
        description="Serve a DDPM over HTTP and WebSocket. Each flag is also a DDPM_* environment variable.",
    )
    for name, field in Settings.model_fields.items():
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        default = field.default_factory() if field.default_factory else field.default
        help_text = f"{field.description + '; ' if field.description else ''}default {default!r}; env DDPM_{name.upper()}"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, choices=choices, help=help_text)
    add_backend_flags(parser.add_argument_group("backend", "where the engines run (Ray: pip install ddpm-serve[ray])"))
    return parser


# Flags that choose where engines run, not how one engine serves: they stay out of Settings.
BACKEND_FLAGS = {
    "backend": (str, "local", "local (one process, one engine) or ray (Ray Serve replicas; RAY_ADDRESS or a "
                              "local Ray)"),
    "replicas": (int, None, "ray: a fixed number of engine replicas"),
    "min_replicas": (int, None, "ray: autoscale from this many replicas..."),
    "max_replicas": (int, None, "ray: ...to this many, on images queued and running"),
    "ingress_copies": (int, 1, "ray: copies of the HTTP ingress"),
}


def add_backend_flags(group: argparse._ArgumentGroup) -> None:
    for name, (kind, default, help_text) in BACKEND_FLAGS.items():
        env = f"DDPM_{name.upper()}"
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind,
                           default=kind(os.environ[env]) if env in os.environ else default,
                           choices=("local", "ray") if name == "backend" else None,
                           help=f"{help_text}; default {default!r}; env {env}")


def settings_from(argv: list[str] | None) -> Settings:
    """Flags over environment over defaults; pydantic validates and converts the flags' strings."""
    flags = {name: value for name, value in vars(build_parser().parse_args(argv)).items()
             if value is not None and name not in BACKEND_FLAGS}
    return Settings(**flags)


def serve_with_ray(argv: list[str] | None) -> int:
    """ddpm-serve --backend ray: the same settings, served by Ray Serve replicas (server/ray)."""
    flags = build_parser().parse_args(argv)
    try:
        settings = settings_from(argv)
        from server.ray.deploy import Scaling, serve_on_ray  # Ray loads only for this backend

        replicas = flags.replicas or 1
        scaling = Scaling(min_replicas=flags.min_replicas or replicas, max_replicas=flags.max_replicas or replicas,
                          ingress_copies=flags.ingress_copies)
    except ValidationError as exc:
        print(f"ddpm-serve: error: {describe_validation_errors(exc.errors(), whole='settings')}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"ddpm-serve: error: --backend ray needs Ray Serve: pip install 'ddpm-serve[ray]' ({exc})",
              file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"ddpm-serve: error: {exc}", file=sys.stderr)
        return 2
    return serve_on_ray(settings, scaling)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM (or Ctrl-C) drains the engine before uvicorn stops.

    Left to itself, uvicorn closes every WebSocket at once (1012) and cancels running HTTP
    requests after its timeout, and then the engine drains for a second grace period. Here
    /readyz turns 503 at once, queued work is refused with 503 `shutdown`, running work gets one
    grace period (`--shutdown-grace-s`), then what is left ends with a `shutdown` error (WebSockets
    close 1001); only then does uvicorn stop, and the process exits 0. A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or not self.started or self.loop is None:
            return super().handle_exit(sig, frame)
        self.draining = True  # a signal handler: hand the work to the loop
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain_then_exit()))

    async def drain_then_exit(self) -> None:
        try:
            await drain(self.app)
        finally:
            self.should_exit = True


class WithoutQuery(logging.Filter):
    """Access-log lines without query strings: whatever a client puts in a URL stays out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:  # uvicorn: client, method, path, version, status
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).split("?", 1)[0], version, status)
        return True


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the weights load: a busy port fails in a second, not after.

    Its connections inherit a bounded kernel send buffer: left to autotuning, the kernel buffered
    megabytes for a WebSocket client that had stopped reading, so our sends kept succeeding (and
    the engine kept computing for it) for minutes before --ws-send-timeout-s could notice."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 after a clean stop, 1 when the server cannot start (weights, device, port,
    job store), 2 for invalid options."""
    if build_parser().parse_args(argv).backend == "ray":
        return serve_with_ray(argv)
    try:
        settings = settings_from(argv)
        sock = listen(settings.host, settings.port)
        repository = open_repository(settings.jobs_url)
        sleep_idle_threads()  # before torch loads: see model/threads.py and the README's measurements
        torch_threads = reserve_cores_for_engine(settings)
        ddpm = load_model(settings)
    except ValidationError as exc:
        print(f"ddpm-serve: error: {describe_validation_errors(exc.errors(), whole='settings')}", file=sys.stderr)
        return 2
    except (StartupError, StoreError) as exc:
        print(f"ddpm-serve: error: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, engine_factory=real_engine_factory(ddpm, torch_threads), repository=repository)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
        ws_max_size=settings.max_body_bytes,
        http=functools.partial(GuardedH11Protocol, read_timeout_s=settings.read_timeout_s,
                               max_header_bytes=settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
    )
    # uvicorn configures its own loggers in Config(); ours (the server.* modules) print the same way.
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(message)s")
    logging.getLogger("uvicorn.access").addFilter(WithoutQuery())
    DrainingServer(config, app).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
