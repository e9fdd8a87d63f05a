"""Ray Serve replicas against one plain process, same machine, same load.

    python -m bench.replicas                      # tiny preset: 2 replicas x 1 thread vs 1 ddpm-serve x 2 threads
    python -m bench.replicas --weights weights/ddpm-mnist.safetensors --requests 64 --steps 50

Both servers run as subprocesses of `ddpm-serve` (the Ray one starts a local Ray instance) and
get the same clients from bench.serve_load (REST and WebSocket mixed). Prints throughput, p50/p99
latency and time to first frame for each, and the ratio ray / plain (goal >= 0.9: the cost of
Ray's routing and streaming at most 10%).
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
from pathlib import Path

import httpx

from bench.serve_load import add_load_arguments, through_server, weights_or_tiny

READY_TIMEOUT_S = 300  # Ray's start on a loaded 2-core machine takes tens of seconds


def start(weights: Path, args: argparse.Namespace, flags: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "server.cli", "--weights", str(weights), "--port", str(port), "--device", "cpu",
               "--max-batch", str(args.max_batch), "--max-queue", str(max(256, args.requests * args.n)),
               "--max-preview-fps", "1000", "--log-level", "warning", "--jobs-db", "memory://", *flags]
    process = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(process)
    raise SystemExit(f"{' '.join(flags)}: the server did not become ready")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def measure(name: str, weights: Path, args: argparse.Namespace, flags: list[str]) -> dict:
    process, url = start(weights, args, flags)
    try:
        asyncio.run(through_server(url, argparse.Namespace(**{**vars(args), "requests": args.clients})))  # warm-up
        row = asyncio.run(through_server(url, args)).summary()
    finally:
        stop(process)
    return {**row, "run": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, requests=48)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        weights = weights_or_tiny(args.weights, scratch)
        plain = measure("plain 1x2 threads", weights, args, ["--torch-threads", "2"])
        ray = measure("ray 2x1 thread", weights, args, ["--torch-threads", "1", "--backend", "ray", "--replicas", "2"])

    print(f"{args.clients} clients, {args.requests} requests x {args.n} images, {args.steps} steps, "
          f"max_batch {args.max_batch}, " + (f"1 in {args.ws_every} over WebSocket" if args.ws_every else "REST only"))
    for row in (plain, ray):
        print("  " + "  ".join(f"{key}={value}" for key, value in row.items()))
    ratio = ray["images_per_s"] / plain["images_per_s"]
    print(f"  ray/plain throughput ratio = {ratio:.2f} (goal >= 0.9)")
    print(json.dumps({"plain": plain, "ray": ray, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
