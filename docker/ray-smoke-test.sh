#!/usr/bin/env bash
# End-to-end check of docker-compose.yml's `ray` profile: several Ray "nodes" on one host, a
# head (the HTTP ingress, no engine) and two worker containers (one engine replica each). It
# builds the image, starts the profile, waits for /readyz, then checks that GET /replicas lists
# two replicas on the two worker containers' nodes, that POST /generate answers with images and
# an X-DDPM-Replica header naming both replicas across requests (the same seed, the same image),
# that /metrics labels the engine metrics by replica, that a POST /jobs + GET /jobs/{id} round
# trip works, and that the head stops gracefully. Everything is torn down (`down -v`) even when
# a step fails.
#
#   docker/ray-smoke-test.sh
#   BASE_IMAGE=ddpm-local/python:3.11-slim TORCH_INDEX_URL=https://pypi.org/simple docker/ray-smoke-test.sh
#
# The second line is for a machine without a registry or download.pytorch.org: the local base
# image (../shared/docker/local-base.sh) carries torch's CPU wheel and pins it, and PyPI serves
# the rest (Ray among it).
# RAY_SMOKE_PORT: host port to publish the head on (default 18001, away from the profile's 8001).
# RAY_SMOKE_READY_TIMEOUT: seconds to wait for /readyz (default 300).
# BASE_IMAGE, TORCH_SPEC, TORCH_INDEX_URL: passed to the build, as docker-compose.yml does.
# Needs Docker with compose (v2 plugin or docker-compose v1 >= 1.28, for profiles) and python3
# on the host.
set -euo pipefail
# shellcheck source=docker/smoke-lib.sh
source "$(dirname "$0")/smoke-lib.sh"
cd "$(dirname "$0")/.."

export DDPM_RAY_HOST_PORT=${RAY_SMOKE_PORT:-18001}
export DDPM_IMAGE_TAG=${DDPM_IMAGE_TAG:-smoke}
export DDPM_API_KEYS=""  # the checks below send no key
READY_TIMEOUT=${RAY_SMOKE_READY_TIMEOUT:-300}
PROJECT=ddpm-ray-smoke-$$
IMAGE="ddpm-serve:$DDPM_IMAGE_TAG-ray"

smoke_logs() {
  print_logs ray-head 80 "ray-head logs (last 80 lines)"
  print_logs ray-worker 30 "ray-worker logs (last 30 lines each)"
}
smoke_init ray-smoke-test "$DDPM_RAY_HOST_PORT" 45 --profile ray

step "compose config (profile ray)"
services=$(compose config --services)
for service in ray-head ray-worker; do
  grep -qx "$service" <<<"$services" || { echo "the ray profile has no $service service" >&2; exit 1; }
done
passed

step "build image $IMAGE (EXTRAS=ray)"
# Both services name the build (the second is all cache), so neither tries to pull the image.
compose build ray-head ray-worker >&2
passed "$(image_size "$IMAGE")"

step "start the head and two workers"
up_started=$SECONDS
compose up -d ray-head ray-worker >&2
HEAD=$(compose ps -q ray-head)
WORKERS=$(compose ps -q ray-worker)
[ "$(wc -w <<<"$WORKERS")" = 2 ] || { echo "expected 2 ray-worker containers, got: $WORKERS" >&2; exit 1; }
passed

step "GET /readyz on the published port"
wait_ready "$DDPM_RAY_HOST_PORT" "$READY_TIMEOUT" "$HEAD" head
passed "ready $((SECONDS - up_started))s after up"

step "Ray cluster: a head and two worker nodes"
# The workers' node ids, by their containers' addresses on the compose network.
worker_ips=$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' $WORKERS)
nodes_json=$(docker exec "$HEAD" ray list nodes --format json)
WORKER_NODES=$(python3 - "$worker_ips" "$nodes_json" <<'PY'
import json, sys

worker_ips = set(sys.argv[1].split())
nodes = [node for node in json.loads(sys.argv[2]) if node["state"] == "ALIVE"]
heads = [node for node in nodes if node["is_head_node"]]
workers = [node for node in nodes if node["node_ip"] in worker_ips]
if len(nodes) != 3 or len(heads) != 1 or len(workers) != 2:
    sys.exit(f"expected 3 alive nodes (a head, 2 workers at {sorted(worker_ips)}), got "
             f"{[(node['node_ip'], node['is_head_node']) for node in nodes]}")
print(" ".join(node["node_id"] for node in workers))
PY
)
passed "worker nodes ${WORKER_NODES// /, }"

step "GET /replicas: two replicas, one on each worker node"
REPLICAS=$(python3 - "$DDPM_RAY_HOST_PORT" "$WORKER_NODES" <<'PY'
import json, sys, time, urllib.request

port, worker_nodes = sys.argv[1], set(sys.argv[2].split())
deadline = time.monotonic() + 30  # the board is refreshed twice a second
while True:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/replicas", timeout=10) as response:
        replicas = json.load(response)
    if len(replicas) == 2 and all(replica["state"] == "running" for replica in replicas) or time.monotonic() > deadline:
        break
    time.sleep(1)
summary = [(r["id"], r["node"][:12], r["state"], r["device"], r["threads"]) for r in replicas]
if len(replicas) != 2 or any(replica["state"] != "running" for replica in replicas):
    sys.exit(f"expected 2 running replicas, got {summary}")
nodes = {replica["node"] for replica in replicas}
if nodes != worker_nodes:
    sys.exit(f"the replicas run on nodes {sorted(nodes)}, not on the two worker nodes {sorted(worker_nodes)}")
print(" ".join(replica["id"] for replica in replicas))
print(f"replicas {summary}", file=sys.stderr)
PY
)
passed "replicas ${REPLICAS// /, }"

step "POST /generate: images from both replicas (X-DDPM-Replica), /metrics by replica"
checks=$(python3 - "$DDPM_RAY_HOST_PORT" "$REPLICAS" <<'PY'
import base64, json, re, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

port, replicas = sys.argv[1], set(sys.argv[2].split())
BASE = f"http://127.0.0.1:{port}"
PNG = b"\x89PNG\r\n\x1a\n"


def check(condition, message):
    if not condition:
        raise SystemExit(f"check failed: {message}")


def generate(seed):
    body = json.dumps({"n": 1, "steps": 10, "sampler": "ddim", "seed": seed}).encode()
    request = urllib.request.Request(BASE + "/generate", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.headers.get("X-DDPM-Replica"), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None, error.read()[:300]


seen: dict[str, int] = {}
images: dict[int, set[str]] = {}
requests = 0
# Four at a time, each seed twice: Ray's router spreads concurrent requests over the replicas.
with ThreadPoolExecutor(4) as pool:
    for _ in range(5):
        for status, replica, body in pool.map(generate, [1, 2, 1, 2]):
            requests += 1
            check(status == 200, f"POST /generate answered {status}: {body!r}")
            check(replica in replicas, f"X-DDPM-Replica is {replica!r}, not one of {sorted(replicas)}")
            (image,) = body["data"]
            check(base64.b64decode(image["b64_json"]).startswith(PNG), "an image is not a PNG")
            seen[replica] = seen.get(replica, 0) + 1
            images.setdefault(image["seed"], set()).add(image["b64_json"])
        if len(seen) == 2:
            break
check(set(seen) == replicas, f"only replica(s) {sorted(seen)} answered {requests} requests")
check(all(len(found) == 1 for found in images.values()), "the same seed gave different images")

deadline = time.monotonic() + 10  # replicas report to the board twice a second
while True:
    with urllib.request.urlopen(BASE + "/metrics", timeout=10) as response:
        text = response.read().decode()
    labelled = set(re.findall(r'^ddpm_requests_finished_total\{[^}]*replica="([^"]+)"[^}]*\} \S+$', text, re.M))
    if labelled == replicas or time.monotonic() > deadline:
        break
    time.sleep(1)
check(labelled == replicas, f"/metrics labels ddpm_requests_finished_total with {sorted(labelled)}")
print(f"{requests} requests, by replica {dict(sorted(seen.items()))}; seeds {sorted(images)} each one image")
PY
)
passed "$checks"

step "POST /jobs, then GET /jobs/{id} until it succeeds"
checks=$(python3 - "$DDPM_RAY_HOST_PORT" <<'PY'
import base64, json, sys, time, urllib.request

BASE = f"http://127.0.0.1:{sys.argv[1]}"
body = json.dumps({"n": 2, "steps": 10, "sampler": "ddim", "seed": 11}).encode()
request = urllib.request.Request(BASE + "/jobs", data=body, method="POST", headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as response:
    if response.status != 202:
        sys.exit(f"POST /jobs answered {response.status}")
    replica = response.headers.get("X-DDPM-Replica")
    job = json.load(response)
deadline = time.monotonic() + 120
while True:
    with urllib.request.urlopen(f"{BASE}/jobs/{job['id']}", timeout=10) as response:
        state = json.load(response)
    if state["status"] not in ("queued", "running") or time.monotonic() > deadline:
        break
    time.sleep(0.5)
if state["status"] != "succeeded":
    sys.exit(f"job {job['id']} ended {state['status']}: {json.dumps(state)[:300]}")
data = state["result"]["data"]
if len(data) != 2 or not all(base64.b64decode(image["b64_json"]).startswith(b"\x89PNG") for image in data):
    sys.exit(f"job {job['id']} has {len(data)} results, not 2 PNGs")
print(f"job {job['id'][:8]} accepted by {replica or '(no header)'}, succeeded with 2 images")
PY
)
passed "$checks"

step "Docker health check of the head reports healthy"
wait_healthy "$HEAD" "$READY_TIMEOUT" "the head"
passed

step "graceful stop: the head deletes the application, then the workers stop"
compose stop --timeout 45 ray-head >&2
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$HEAD")
[ "$exit_code" = 0 ] || { echo "the head exited with $exit_code on SIGTERM" >&2; exit 1; }
compose stop --timeout 45 ray-worker >&2
# `ray start --block` exits 1 once it has stopped its node on SIGTERM; 137 is a SIGKILL.
codes=$(docker inspect --format '{{.State.ExitCode}}' $WORKERS | tr '\n' ' ')
for code in $codes; do
  [ "$code" != 137 ] || { echo "a worker was killed after the 45 s grace period (exit codes: $codes)" >&2; exit 1; }
done
passed "head 0, workers ${codes% }"
