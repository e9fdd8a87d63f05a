# shellcheck shell=bash
# Shared by docker/smoke-test.sh and docker/ray-smoke-test.sh; sourced, not run. Sourcing only
# defines functions. A script then calls
#
#   smoke_init NAME PORT DOWN_TIMEOUT [COMPOSE_ARG...]
#
# which picks the compose tool (v2 plugin or docker-compose v1; exit 2 without one), defines
# `compose` (the tool with `-p "$PROJECT"` and COMPOSE_ARGs, e.g. `--profile ray`) and arms the
# EXIT trap that, when a step fails, calls the script's `smoke_logs` (if it defines one), then
# runs `compose down --timeout DOWN_TIMEOUT` and prints the summary under NAME. PROJECT must be
# set. Steps are `step "what"` ... `passed ["detail"]`.

smoke_init() {
  SMOKE_NAME=$1
  SMOKE_HOST_PORT=$2
  SMOKE_DOWN_TIMEOUT=$3
  shift 3
  SMOKE_COMPOSE_ARGS=("$@")
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
  else
    echo "$SMOKE_NAME: neither 'docker compose' nor 'docker-compose' is available" >&2
    exit 2
  fi
  SUMMARY=()
  CURRENT=""
  started_at=$SECONDS
  trap smoke_teardown EXIT
  trap 'exit 130' INT TERM
}

compose() { "${COMPOSE[@]}" -p "$PROJECT" ${SMOKE_COMPOSE_ARGS[@]+"${SMOKE_COMPOSE_ARGS[@]}"} "$@"; }

step() {  # step NAME: print a header and remember the name for the summary
  CURRENT=$1
  STEP_STARTED=$SECONDS
  echo "==> $CURRENT" >&2
}

passed() {  # passed [DETAIL]: the current step passed
  SUMMARY+=("PASS  $(printf '%4ss' $((SECONDS - STEP_STARTED)))  $CURRENT${1:+  ($1)}")
  CURRENT=""
}

print_logs() {  # print_logs SERVICE LINES TITLE: the service's last LINES lines of logs, on stderr
  echo "--- $3 ---" >&2
  compose logs --no-color --tail "$2" "$1" >&2 || true
}

smoke_teardown() {
  local status=$?
  if [ -n "$CURRENT" ]; then
    SUMMARY+=("FAIL  $(printf '%4ss' $((SECONDS - STEP_STARTED)))  $CURRENT")
    if declare -F smoke_logs >/dev/null; then smoke_logs; fi
  fi
  compose down --volumes --remove-orphans --timeout "$SMOKE_DOWN_TIMEOUT" >/dev/null 2>&1 || true
  echo
  echo "$SMOKE_NAME summary (${COMPOSE[*]}, port $SMOKE_HOST_PORT, ${BASE_IMAGE:-python:3.11-slim}):"
  printf '  %s\n' "${SUMMARY[@]}"
  if [ "$status" -eq 0 ]; then
    echo "$SMOKE_NAME: OK in $((SECONDS - started_at))s"
  else
    echo "$SMOKE_NAME: FAILED (exit $status) in $((SECONDS - started_at))s"
  fi
  exit "$status"
}

image_size() {  # image_size IMAGE: its size in MB, for a `passed` detail
  docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'
}

wait_ready() {  # wait_ready PORT TIMEOUT CONTAINER WHAT: until GET /readyz answers 200
  # Fails at once when the container (WHAT, e.g. "server") exits, dies or restarts first.
  python3 - "$@" <<'PY'
import subprocess, sys, time, urllib.error, urllib.request

port, timeout, container, what = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            if response.status == 200:
                break
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    state = subprocess.run(["docker", "inspect", "--format", "{{.State.Status}} {{.RestartCount}}", container],
                           capture_output=True, text=True).stdout.split()
    if state and (state[0] in ("exited", "dead", "restarting") or state[1] != "0"):
        sys.exit(f"the {what} container is {state[0]} (restarts: {state[1]}) before it was ready")
    if time.monotonic() > deadline:
        sys.exit(f"/readyz did not answer 200 within {timeout:.0f}s")
    time.sleep(1)
PY
}

wait_healthy() {  # wait_healthy CONTAINER TIMEOUT WHAT: until Docker's health check says healthy
  local deadline=$((SECONDS + $2))
  until [ "$(docker inspect --format '{{.State.Health.Status}}' "$1")" = healthy ]; do
    [ $SECONDS -lt "$deadline" ] || { echo "$3 never became healthy" >&2; exit 1; }
    sleep 2
  done
}
