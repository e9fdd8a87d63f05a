#!/usr/bin/env bash
# The GPU worker's one prepared check (bench/gpu_check.py): a PASS/FAIL table at the end.
#
#   bench/gpu_check.sh                  # on a GPU machine: about 8 minutes on one GPU
#   bench/gpu_check.sh --cpu            # the same stages on the CPU (CUDA-only checks skip), < 3 minutes
#   bench/gpu_check.sh --fetch-wheels   # where PyPI answers: the engine's pydantic for a GPU machine
#                                       # whose Python (3.12) has torch but no web stack
#
# Only torch and what model/ needs (numpy, pillow, safetensors, tqdm) must be installed; the
# engine's contract also needs pydantic: where it is missing, the wheels that --fetch-wheels put
# in build/gpu-check-wheels (ignored by git; carry that folder) are installed into a temporary
# folder first. Other arguments go to bench/gpu_check.py (--stages, --json FILE, --quick).
# Exit status 1 when a check fails.
#
# Where pytest is installed too, `DDPM_TEST_DEVICE=cuda .venv/bin/python -m pytest tests/model
# tests/server/engine` runs those two suites on the GPU (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=build/gpu-check-wheels
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi

if [ "${1:-}" = --fetch-wheels ]; then
  # The versions this checkout's venv runs, for CPython 3.12 on x86-64 Linux.
  mapfile -t pins < <("$PYTHON" -m pip freeze 2>/dev/null \
    | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]}"
  ls "$WHEELS"
  exit
fi

if ! "$PYTHON" -c "import pydantic" 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$PYTHON" -m bench.gpu_check "$@"
