"""The code passes ruff with pyproject.toml's rules: no unused imports or names, nothing
undefined, every zip() strict or saying why not, no syntax newer than the Python the project
declares (requires-python)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "model", "server", "tests", "bench"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
