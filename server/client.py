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
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import connect

from server.contract.sources import OPERATIONS
from server.contract.spec import SAMPLER_NAMES

URL_FORM = "http://host:port"
SUBPROTOCOL = "ddpm"  # what the server selects; the key travels as a second one, "bearer.<base64url(key)>"


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int  # this image's own seed
    png: bytes


class DDPMError(Exception):
    """The server refused or failed a request: HTTP status (0 on a WebSocket), code and message.

    str() is one line: "401 unauthorized: a valid API key is required ..." ("code: message" without
    an HTTP status)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


class DDPMConnectionError(DDPMError):
    """The server could not be reached: "cannot connect to http://127.0.0.1:8000: connection refused"."""

    def __init__(self, url: str, reason: str):
        DDPMError.__init__(self, 0, "cannot_connect", f"cannot connect to {url}: {reason}")
        self.url, self.reason = url, reason

    def __str__(self) -> str:
        return self.message


def normalize_url(url: str) -> str:
    """The server's base URL: http:// is assumed when no scheme is given ("localhost:8000"),
    ws:// and wss:// mean http:// and https://; anything else is a ValueError naming the expected form."""
    url = url.strip()
    scheme_match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if scheme_match is None:
        url = "http://" + url
    else:
        scheme = scheme_match.group(1).lower()
        replacement = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(scheme)
        if replacement is None:
            raise ValueError(f"unsupported URL scheme in {url!r}: expected {URL_FORM}")
        url = replacement + url[len(scheme):]
    url = url.rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid URL {url!r} ({exc}): expected {URL_FORM}") from None
    if not parsed.host:
        raise ValueError(f"invalid URL {url!r}: no host; expected {URL_FORM}")
    return url


def key_subprotocol(api_key: str) -> str:
    """The WebSocket subprotocol that carries the API key: "bearer." + base64url(UTF-8 key), no padding.
    Browsers cannot set headers on a WebSocket, and a key in the URL lands in access logs."""
    return "bearer." + base64.urlsafe_b64encode(api_key.encode()).rstrip(b"=").decode("ascii")


def connection_failure_reason(exc: BaseException) -> str:
    """A short reason for a failed connection, from the OSError at the bottom of the exception chain."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"unknown host ({cause.strerror or cause})"
        if isinstance(cause, (TimeoutError, socket.timeout, httpx.TimeoutException)):
            return "timed out"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


class DDPMClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 3600.0):
        """url: http(s)://host:port; a bare host:port means http://. A ValueError for a URL that is
        not one."""
        self.url = normalize_url(url)
        self.api_key = api_key or None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "DDPMClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(self, n: int = 1, steps: int | None = None, sampler: str = "ddpm", eta: float = 0.0,
                 seed: int | None = None, **image_to_image: Any) -> list[GeneratedImage]:
        """Wait for n images (POST /generate). image_to_image: operation ("variation", "inpaint",
        "interpolate", "reconstruct"), image, mask, image2 (bytes of image files), strength, lambdas,
        t, timesteps, jump_length, jump_n_sample, as the README's image-to-image table."""
        body = request_body(n=n, steps=steps, sampler=sampler, eta=eta, seed=seed, **image_fields(**image_to_image))
        return decode_images(self.call("POST", "/generate", json=body)["data"])

    def stream(self, n: int = 1, steps: int | None = None, sampler: str = "ddpm", eta: float = 0.0,
               seed: int | None = None, preview_every: int = 0,
               preview_kinds: tuple[str, ...] = ("x_t", "x0"), **image_to_image: Any) -> Iterator[dict[str, Any]]:
        """Yield the WebSocket events (queued, started, progress, frame, done) as dicts; an `error`
        event raises DDPMError. Stopping the iteration closes the socket, which cancels the request."""
        body = request_body(n=n, steps=steps, sampler=sampler, eta=eta, seed=seed,
                            preview_every=preview_every, preview_kinds=list(preview_kinds),
                            **image_fields(**image_to_image))
        ws_url = "ws" + self.url[len("http"):] + "/ws/generate"
        subprotocols = [SUBPROTOCOL] + ([key_subprotocol(self.api_key)] if self.api_key else [])
        try:
            websocket = connect(ws_url, additional_headers=self.headers, subprotocols=subprotocols, max_size=None)
        except InvalidStatus as exc:
            raise http_error(exc.response.status_code, exc.response.body) from exc
        except InvalidURI as exc:
            raise DDPMError(0, "invalid_url", f"{exc}: expected {URL_FORM}") from exc
        except InvalidHandshake as exc:
            raise DDPMError(0, "handshake_failed", f"{ws_url}: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise DDPMConnectionError(self.url, connection_failure_reason(exc)) from exc
        with websocket:
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
                   seed: int | None = None, **image_to_image: Any) -> dict[str, Any]:
        """POST /jobs: {id, status, queue_position}."""
        return self.call("POST", "/jobs", json=request_body(n=n, steps=steps, sampler=sampler, eta=eta, seed=seed,
                                                            **image_fields(**image_to_image)))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.call("POST", f"/jobs/{job_id}/cancel")

    def wait_job(self, job_id: str, poll_s: float = 0.5) -> list[GeneratedImage]:
        while (job := self.job(job_id))["status"] in ("queued", "running"):
            time.sleep(poll_s)
        if job["status"] != "succeeded":
            raise DDPMError(0, job["error"]["code"], job["error"]["message"])
        return decode_images(job["result"]["data"])

    def models(self) -> dict[str, Any]:
        return self.call("GET", "/models")

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise DDPMConnectionError(self.url, connection_failure_reason(exc)) from exc
        if response.is_error:
            raise http_error(response.status_code, response.content)
        return response.json()


def http_error(status: int, body: bytes | None) -> DDPMError:
    """The DDPMError for an HTTP error response: the server's {"error": {code, message}}, else the text."""
    try:
        error = json.loads(body or b"")["error"]
        return DDPMError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = " ".join((body or b"").decode(errors="replace").split())[:200]
        return DDPMError(status, "http_error", text or "no details")


def request_body(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def image_fields(operation: str | None = None, image: bytes | None = None, mask: bytes | None = None,
                 image2: bytes | None = None, strength: float | None = None, lambdas: list[float] | None = None,
                 t: int | None = None, timesteps: list[int] | None = None, jump_length: int | None = None,
                 jump_n_sample: int | None = None) -> dict[str, Any]:
    """The image-to-image part of a request body: image files as base64."""
    files = {name: base64.b64encode(data).decode("ascii") for name, data in
             (("image", image), ("mask", mask), ("image2", image2)) if data is not None}
    return request_body(operation=operation, strength=strength, lambdas=lambdas, t=t, timesteps=timesteps,
                        jump_length=jump_length, jump_n_sample=jump_n_sample, **files)


def decode_images(data: list[dict[str, Any]]) -> list[GeneratedImage]:
    return [GeneratedImage(item["index"], item["seed"], base64.b64decode(item["b64_json"])) for item in data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-generate", description="Generate images with a ddpm-serve server.")
    parser.add_argument("--url", default=os.environ.get("DDPM_URL", "http://127.0.0.1:8000"),
                        help="server URL (env DDPM_URL)")
    parser.add_argument("--api-key", default=os.environ.get("DDPM_API_KEY"), help="API key (env DDPM_API_KEY)")
    parser.add_argument("-n", type=int, default=1, help="images")
    parser.add_argument("--steps", type=int,
                        help="denoising steps (default: the model's T for ddpm and ddim, fewer for the solvers)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm",
                        help="ddpm (the paper's), ddim, dpmpp_2m (DPM-Solver++, 10-20 steps), dpmpp_2m_sde, unipc")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0..1 (ddim only)")
    parser.add_argument("--seed", type=int, help="request seed (default: random; printed)")
    parser.add_argument("--operation", choices=OPERATIONS, help="start from --image (see the README)")
    parser.add_argument("--image", type=Path, help="input image file (PNG, JPEG, WebP)")
    parser.add_argument("--mask", type=Path, help="inpaint: PNG whose transparent pixels are regenerated")
    parser.add_argument("--image2", type=Path, help="interpolate: the second image")
    parser.add_argument("--strength", type=float, help="variation: 0 < s <= 1 (default 0.75)")
    parser.add_argument("--lambdas", type=numbers(float), help="interpolate: e.g. 0,0.25,0.5,0.75,1")
    parser.add_argument("--t", type=int, help="interpolate: the t to encode at (default 500)")
    parser.add_argument("--timesteps", type=numbers(int), help="reconstruct: e.g. 250,500,750")
    parser.add_argument("--jump-length", type=int, help="inpaint: RePaint's jump length (default 10)")
    parser.add_argument("--jump-n-sample", type=int,
                        help="inpaint: RePaint's resamplings per jump (default 1: none; r multiplies the steps)")
    parser.add_argument("-o", "--out", type=Path, default=Path("."), help="folder for the PNGs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # Every failure below is one line on stderr and a non-zero status, never a traceback.
    try:
        args.url = normalize_url(args.url)
    except ValueError as exc:
        print(f"ddpm-generate: error: --url: {one_line(str(exc))}", file=sys.stderr)
        return 2
    try:
        return generate_files(args)
    except KeyboardInterrupt:
        print("ddpm-generate: interrupted", file=sys.stderr)
        return 130
    except (DDPMError, OSError, httpx.HTTPError, WebSocketException) as exc:
        hint = " (give --api-key or set DDPM_API_KEY)" if isinstance(exc, DDPMError) and exc.status == 401 else ""
        print(f"ddpm-generate: error: {one_line(str(exc))}{hint}", file=sys.stderr)
        return 1


def numbers(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"a comma-separated list of numbers, got {text!r}") from None
    return parse


def image_options(args: argparse.Namespace) -> dict[str, Any]:
    files = {name: getattr(args, name).read_bytes() for name in ("image", "mask", "image2") if getattr(args, name)}
    return {"operation": args.operation, "strength": args.strength, "lambdas": args.lambdas, "t": args.t,
            "timesteps": args.timesteps, "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample,
            **files}


def one_line(text: str) -> str:
    return " ".join(text.split())


def generate_files(args: argparse.Namespace) -> int:
    """Stream one request, show a progress bar once the server answers, save the PNGs."""
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    with DDPMClient(args.url, args.api_key) as client:
        bar = None  # made at the first event, so a failed connection prints nothing but its error
        try:
            for event in client.stream(args.n, args.steps, args.sampler, args.eta, args.seed, **image_options(args)):
                if bar is None:
                    bar = tqdm(desc="denoising", unit="step", disable=args.quiet)
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
        finally:
            if bar is not None:
                bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
