"""bench/gpu_check.sh, the GPU worker's one prepared check, run on the CPU with its smallest
settings: every stage must still run (or skip with a reason), so the script cannot rot between
the rare runs on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--quick", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    stages = {row["stage"] for row in rows}
    assert stages == {"environment", "parity", "batch", "syncs", "engine", "speed", "train"}
    skipped = {row["stage"] for row in rows if row["status"] == "SKIP"}
    assert skipped <= {"parity", "batch", "syncs", "speed"}, rows  # only CUDA-only checks skip on a CPU
    assert all(row["detail"] for row in rows if row["status"] == "SKIP")
    assert {row["check"] for row in rows if row["stage"] == "engine" and row["status"] == "PASS"} >= {
        "images equal DDPM.sample of their seeds", "injected out-of-memory: retried, cap regrown",
        "sticky device error: fails loudly, unhealthy"}
