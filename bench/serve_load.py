"""End-to-end load: N concurrent clients (REST and WebSocket mixed) against `ddpm-serve` on
loopback, beside the engine alone on the same workload and batch cap.

    python -m bench.serve_load                                   # tiny preset, 8 clients, 32 requests
    python -m bench.serve_load --weights weights/ddpm-mnist.safetensors --clients 16 --requests 64 --steps 50

Prints throughput (images/s), p50/p99 request latency, p50 time to first frame (WebSocket
requests ask for previews), and requests lost (anything but a success: must be 0). The ratio
serve / engine is the cost of HTTP, JSON, base64 and the sockets; the goal is >= 0.9.
The server runs as a subprocess so clients and server do not share one interpreter lock.
Bounded: --requests in all and --time-limit-s per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import numpy as np
import torch
from websockets.asyncio.client import connect

import model
from server.contract import Done, EngineConfig, Frame, GenerationSpec, validate
from server.engine import Engine


@dataclass
class Outcome:
    latency_s: float | None = None  # None: lost
    first_frame_s: float | None = None


@dataclass
class Report:
    name: str
    wall_s: float
    images: int
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | str]:
        latencies = [o.latency_s for o in self.outcomes if o.latency_s is not None]
        first_frames = [o.first_frame_s for o in self.outcomes if o.first_frame_s is not None]
        return {
            "run": self.name,
            "images_per_s": round(self.images / self.wall_s, 2),
            "p50_latency_s": round(float(np.percentile(latencies, 50)), 3) if latencies else float("nan"),
            "p99_latency_s": round(float(np.percentile(latencies, 99)), 3) if latencies else float("nan"),
            "p50_first_frame_s": round(float(np.median(first_frames)), 3) if first_frames else float("nan"),
            "lost": len(self.outcomes) - len(latencies),
        }


async def run_clients(name: str, args: argparse.Namespace, one_request: Callable[[int], Awaitable[Outcome]]) -> Report:
    """`clients` workers share `requests` requests; request i is a WebSocket one when i % ws_every == 0."""
    pending = iter(range(args.requests))
    outcomes: list[Outcome] = []

    async def worker() -> None:
        for index in pending:
            try:
                outcomes.append(await one_request(index))
            except Exception as exc:  # a lost request: counted, reported, never fatal to the run
                print(f"  {name} request {index} lost: {exc!r}", file=sys.stderr)
                outcomes.append(Outcome())

    began = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.clients))), args.time_limit_s)
    wall_s = time.perf_counter() - began
    images = args.n * sum(o.latency_s is not None for o in outcomes)
    return Report(name, wall_s, images, outcomes)


def wants_previews(args: argparse.Namespace, index: int) -> bool:
    return args.ws_every > 0 and index % args.ws_every == 0


async def engine_alone(ddpm: model.DDPM, args: argparse.Namespace) -> Report:
    engine = Engine(ddpm, EngineConfig(max_batch=args.max_batch, max_queue=max(256, args.requests * args.n)))
    await engine.start()

    async def one_request(index: int) -> Outcome:
        preview_every = args.preview_every if wants_previews(args, index) else 0
        began, first_frame = time.perf_counter(), None
        spec = GenerationSpec(n=args.n, steps=args.steps, seed=index, preview_every=preview_every)
        handle = engine.submit(validate(spec, engine.limits))
        async for event in handle.events():
            if isinstance(event, Frame) and first_frame is None:
                first_frame = time.perf_counter() - began
            if isinstance(event, Done):
                return Outcome(time.perf_counter() - began, first_frame)
        raise RuntimeError("ended without images")

    try:
        return await run_clients("engine", args, one_request)
    finally:
        await engine.shutdown()


async def through_server(url: str, args: argparse.Namespace) -> Report:
    ws_url = "ws" + url[len("http"):] + "/ws/generate"
    async with httpx.AsyncClient(base_url=url, timeout=args.time_limit_s,
                                 limits=httpx.Limits(max_connections=args.clients)) as http:

        async def rest(index: int) -> Outcome:
            began = time.perf_counter()
            response = await http.post("/generate", json={"n": args.n, "steps": args.steps, "seed": index})
            response.raise_for_status()
            assert len(response.json()["data"]) == args.n
            return Outcome(time.perf_counter() - began)

        async def websocket(index: int) -> Outcome:
            began, first_frame = time.perf_counter(), None
            request = {"n": args.n, "steps": args.steps, "seed": index, "preview_every": args.preview_every}
            async with connect(ws_url, max_size=None) as ws:
                await ws.send(json.dumps(request))
                async for message in ws:
                    event = json.loads(message)
                    if event["type"] == "frame" and first_frame is None:
                        first_frame = time.perf_counter() - began
                    elif event["type"] == "done":
                        return Outcome(time.perf_counter() - began, first_frame)
                    elif event["type"] == "error":
                        raise RuntimeError(f"{event['code']}: {event['message']}")
            raise RuntimeError("socket closed without images")

        return await run_clients("serve", args, lambda i: websocket(i) if wants_previews(args, i) else rest(i))


def start_server(weights: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
    command = [sys.executable, "-m", "server.cli", "--weights", str(weights), "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(max(256, args.requests * args.n)),
               "--max-preview-fps", "1000", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("ddpm-serve did not become ready")


def add_load_arguments(parser: argparse.ArgumentParser, requests: int) -> None:
    """The workload options that run_clients and through_server read; bench.replicas drives the
    same clients, so it takes the same options (`requests` is the default count)."""
    parser.add_argument("--weights", type=Path, help="a weights file (default: the tiny preset, random weights)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--ws-every", type=int, default=2, help="every k-th request is a WebSocket one (0: none)")
    parser.add_argument("--preview-every", type=int, default=5, help="WebSocket requests' preview cadence")
    parser.add_argument("--time-limit-s", type=float, default=600.0, help="per pass of the clients over --requests")


def weights_or_tiny(weights: Path | None, scratch: str) -> Path:
    """`weights`, or the tiny preset with random weights saved under `scratch`: the default load
    measures serving overhead, not the model."""
    if weights is not None:
        return weights
    config = model.preset("tiny")
    tiny = Path(scratch) / "tiny.safetensors"
    model.save(model.DDPM(model.UNet(config.unet), config), tiny)
    return tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, requests=32)
    parser.add_argument("--threads", type=int, help="torch threads, engine and server alike")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        weights = weights_or_tiny(args.weights, scratch)
        alone = asyncio.run(engine_alone(model.load(weights), args))
        process, url = start_server(weights, args)
        try:
            served = asyncio.run(through_server(url, args))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    rows = [alone.summary(), served.summary()]
    print(f"{args.clients} clients, {args.requests} requests x {args.n} images, {args.steps} steps, "
          f"max_batch {args.max_batch}, " + (f"1 in {args.ws_every} requests over WebSocket" if args.ws_every else "REST only"))
    for row in rows:
        print("  " + "  ".join(f"{key}={value}" for key, value in row.items()))
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"  serve/engine throughput ratio = {ratio:.2f} (goal >= 0.9); lost = {rows[1]['lost']}")
    print(json.dumps({"engine": rows[0], "serve": rows[1], "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
