#!/usr/bin/env bash
# End-to-end check of the image and the compose stack: build, start, wait for /readyz, then
# POST /generate, a WebSocket stream and /metrics, with an API key set from the environment
# to prove that DDPM_* settings reach the server. The stack is always torn down.
#
#   docker/smoke-test.sh
#   BASE_IMAGE=ddpm-local/python:3.11-slim SMOKE_PORT=18000 docker/smoke-test.sh
#
# SMOKE_PORT: host port to publish (default 18000, away from a developer's own 8000).
# SMOKE_READY_TIMEOUT: seconds to wait for /readyz and a healthy container (default 180).
# BASE_IMAGE, TORCH_SPEC, TORCH_INDEX_URL: passed to the build, as docker-compose.yml does.
# Needs Docker with compose (v2 plugin or docker-compose v1) and python3 on the host.
set -euo pipefail
# shellcheck source=docker/smoke-lib.sh
source "$(dirname "$0")/smoke-lib.sh"
cd "$(dirname "$0")/.."

export DDPM_HOST_PORT=${SMOKE_PORT:-18000}
export DDPM_API_KEYS=smoke-test-key
export DDPM_IMAGE_TAG=${DDPM_IMAGE_TAG:-smoke}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-180}
PROJECT=ddpm-smoke-$$

smoke_logs() { print_logs server 60 "server logs (last 60 lines)"; }
smoke_init smoke-test "$DDPM_HOST_PORT" 30

step "compose config"
compose config -q
passed

step "build image ddpm-serve:$DDPM_IMAGE_TAG"
compose build server >&2
passed "$(image_size "ddpm-serve:$DDPM_IMAGE_TAG")"

step "start the server"
compose up -d server >&2
CONTAINER=$(compose ps -q server)
passed

step "GET /readyz on the published port"
wait_ready "$DDPM_HOST_PORT" "$READY_TIMEOUT" "$CONTAINER" server
passed

step "container runs as non-root, weights mounted read-only"
uid=$(compose exec -T server id -u)
[ "$uid" != 0 ] || { echo "the server runs as root" >&2; exit 1; }
mounts=$(docker inspect --format '{{range .Mounts}}{{.Destination}}:{{.RW}} {{end}}' "$CONTAINER")
[[ " $mounts" == *" /app/weights:false "* ]] || { echo "/app/weights is not a read-only mount: $mounts" >&2; exit 1; }
passed "uid $uid"

step "POST /generate, WebSocket /ws/generate, /metrics (from inside the container)"
# The image's own Python has websockets and needs nothing from the host.
checks=$(compose exec -T -e SMOKE_KEY="$DDPM_API_KEYS" server python - <<'PY'
import base64, json, os, re, urllib.error, urllib.request
from websockets.sync.client import connect

BASE = "http://127.0.0.1:8000"
AUTH = {"Authorization": f"Bearer {os.environ['SMOKE_KEY']}"}
PNG = b"\x89PNG\r\n\x1a\n"


def http(method, path, body=None, headers=AUTH):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(BASE + path, data=data, method=method,
                                     headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def check(condition, message):
    if not condition:
        raise SystemExit(f"check failed: {message}")


status, _ = http("GET", "/healthz", headers={})
check(status == 200, f"/healthz answered {status}")

status, _ = http("POST", "/generate", {"n": 1, "steps": 5}, headers={})
check(status == 401, f"POST /generate without the API key answered {status}, not 401")

status, body = http("POST", "/generate", {"n": 2, "steps": 10, "sampler": "ddim", "seed": 7})
check(status == 200, f"POST /generate answered {status}: {body[:300]!r}")
images = json.loads(body)["data"]
check(len(images) == 2, f"POST /generate returned {len(images)} images, not 2")
check(all(base64.b64decode(image["b64_json"]).startswith(PNG) for image in images), "an image is not a PNG")
seeds = [image["seed"] for image in images]

events = []
with connect("ws://127.0.0.1:8000/ws/generate", additional_headers=AUTH, open_timeout=30) as socket:
    socket.send(json.dumps({"n": 1, "steps": 6, "sampler": "ddim", "seed": 3, "preview_every": 3}))
    while not events or events[-1]["type"] not in ("done", "error"):
        events.append(json.loads(socket.recv(timeout=300)))
kinds = [event["type"] for event in events]
check(kinds[-1] == "done", f"the stream ended with {events[-1]}")
check("frame" in kinds and "progress" in kinds, f"the stream lacked frames or progress: {kinds}")

status, body = http("GET", "/metrics")
check(status == 200, f"/metrics answered {status}")
text = body.decode()
finished = sum(float(v) for v in re.findall(r"^ddpm_requests_finished_total\{[^}]*\} (\S+)$", text, re.M))
check(finished >= 2, f"ddpm_requests_finished_total is {finished}, expected >= 2")
print(f"2 images seeds {seeds}; stream of {len(events)} events ({kinds.count('frame')} frames); "
      f"{finished:.0f} requests finished in /metrics")
PY
)
passed "$checks"

step "Docker health check reports healthy"
wait_healthy "$CONTAINER" "$READY_TIMEOUT" "the container"
passed

step "graceful stop"
compose stop --timeout 45 server >&2
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$CONTAINER")
[ "$exit_code" = 0 ] || { echo "the server exited with $exit_code on SIGTERM" >&2; exit 1; }
passed
