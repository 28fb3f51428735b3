"""The bench scripts run (smoke mode: tiny sizes, one repeat; no figure is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = ["overhead.py", "frozen.py", "data.py", "fastpaths.py", "cache.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs_in_smoke_mode(script: str, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke",
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert table.startswith("### ") and "machine: " in table and "| --- |" in table


def test_startup_script_runs_in_smoke_mode(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(REPO / "bench" / "startup.sh"), "--smoke"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launch to first training step" in result.stdout
