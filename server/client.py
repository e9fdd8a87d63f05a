"""A Python client for ddpm-serve (httpx + websockets; no torch), and the ddpm-generate command.

    client = DDPMClient("http://127.0.0.1:8000", api_key=None)
    images = client.generate(n=4, steps=50, sampler="ddim", seed=0)     # [GeneratedImage]
    for event in client.stream(n=1, steps=100, preview_every=10):       # live events (dicts)
        ...
    job = client.submit_job(n=8); client.wait_job(job["id"])

    ddpm-generate --url http://127.0.0.1:8000 -n 4 --steps 50 -o out/
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int  # this image's own seed
    png: bytes


class DDPMError(Exception):
    """The server refused or failed a request: HTTP status (0 on a WebSocket), code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status else ""))
        self.status, self.code, self.message = status, code, message


class DDPMClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "DDPMClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(self, n: int = 1, steps: int | None = None, sampler: str = "ddpm", eta: float = 0.0,
                 seed: int | None = None) -> list[GeneratedImage]:
        """Wait for n images (POST /generate)."""
        body = request_body(n=n, steps=steps, sampler=sampler, eta=eta, seed=seed)
        return decode_images(self.call("POST", "/generate", json=body)["data"])

    def stream(self, n: int = 1, steps: int | None = None, sampler: str = "ddpm", eta: float = 0.0,
               seed: int | None = None, preview_every: int = 0,
               preview_kinds: tuple[str, ...] = ("x_t", "x0")) -> Iterator[dict[str, Any]]:
        """Yield the WebSocket events (queued, started, progress, frame, done) as dicts; an `error`
        event raises DDPMError. Stopping the iteration closes the socket, which cancels the request."""
        body = request_body(n=n, steps=steps, sampler=sampler, eta=eta, seed=seed,
                            preview_every=preview_every, preview_kinds=list(preview_kinds))
        ws_url = "ws" + self.url[len("http"):] + "/ws/generate"
        with connect(ws_url, additional_headers=self.headers, max_size=None) as websocket:
            websocket.send(json.dumps(body))
            try:
                for message in websocket:
                    event = json.loads(message)
                    if event["type"] == "error":
                        raise DDPMError(0, event["code"], event["message"])
                    yield event
            except ConnectionClosed as exc:
                raise DDPMError(0, "connection_closed", str(exc)) from exc

    def submit_job(self, n: int = 1, steps: int | None = None, sampler: str = "ddpm", eta: float = 0.0,
                   seed: int | None = None) -> dict[str, Any]:
        """POST /jobs: {id, status, queue_position}."""
        return self.call("POST", "/jobs", json=request_body(n=n, steps=steps, sampler=sampler, eta=eta, seed=seed))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.call("DELETE", f"/jobs/{job_id}")

    def wait_job(self, job_id: str, poll_s: float = 0.5) -> list[GeneratedImage]:
        while (job := self.job(job_id))["status"] in ("queued", "running"):
            time.sleep(poll_s)
        if job["status"] != "succeeded":
            raise DDPMError(0, job["error"]["code"], job["error"]["message"])
        return decode_images(job["result"]["data"])

    def models(self) -> dict[str, Any]:
        return self.call("GET", "/models")

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:200]}
            raise DDPMError(response.status_code, error["code"], error["message"])
        return response.json()


def request_body(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def decode_images(data: list[dict[str, Any]]) -> list[GeneratedImage]:
    return [GeneratedImage(item["index"], item["seed"], base64.b64decode(item["b64_json"])) for item in data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-generate", description="Generate images with a ddpm-serve server.")
    parser.add_argument("--url", default=os.environ.get("DDPM_URL", "http://127.0.0.1:8000"),
                        help="server URL (env DDPM_URL)")
    parser.add_argument("--api-key", default=os.environ.get("DDPM_API_KEY"), help="API key (env DDPM_API_KEY)")
    parser.add_argument("-n", type=int, default=1, help="images")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's T)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0..1")
    parser.add_argument("--seed", type=int, help="request seed (default: random; printed)")
    parser.add_argument("-o", "--out", type=Path, default=Path("."), help="folder for the PNGs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    with DDPMClient(args.url, args.api_key) as client:
        bar = tqdm(desc="denoising", unit="step", disable=args.quiet)
        try:
            for event in client.stream(args.n, args.steps, args.sampler, args.eta, args.seed):
                if event["type"] == "queued":
                    bar.set_postfix_str(f"queue position {event['position']}")
                elif event["type"] == "progress":
                    bar.total = event["total"]
                    bar.set_postfix_str("")
                    bar.update(event["step"] - bar.n)
                elif event["type"] == "done":
                    bar.close()
                    for image in decode_images(event["data"]):
                        path = args.out / f"ddpm-{event['seed']}-{image.index}.png"
                        path.write_bytes(image.png)
                        print(f"{path}  (image seed {image.seed})")
        except (DDPMError, OSError) as exc:
            bar.close()
            print(f"ddpm-generate: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
