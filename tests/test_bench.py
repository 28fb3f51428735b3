"""The bench scripts run (smoke mode: tiny sizes, one repeat; no figure is asserted)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = ["overhead.py", "frozen.py", "data.py", "fastpaths.py", "cache.py",
           "detection_transfer.py", "detection_overhead.py", "detection_eval.py",
           "segmentation_overhead.py",
           "adapters.py", "uint8.py", "time_to_accuracy.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs_in_smoke_mode(script: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as `python bench/SCRIPT --smoke --out FILE` would, in this process (the scripts'
    main() under __main__, their framework runs through finetune.train: no interpreter and
    torch import per script or run)."""
    out = tmp_path / "results.md"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_BENCH_IN_PROCESS", "1")
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / script), "--smoke", "--out",
                                      str(out)])
    try:
        runpy.run_path(str(REPO / "bench" / script), run_name="__main__")
    except SystemExit as done:
        assert not done.code, f"{script} exited with {done.code}"
    table = out.read_text()
    assert table.startswith("### ") and "machine: " in table and "| --- |" in table


def test_startup_script_runs_in_smoke_mode(tmp_path: Path) -> None:
    """With the interpreter that runs the tests (PYTHON), whether or not its venv is on PATH."""
    env = {**os.environ, "PYTHON": sys.executable,
           "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                   if Path(sys.executable).parent != Path(p))}
    result = subprocess.run(["bash", str(REPO / "bench" / "startup.sh"), "--smoke"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launch to first training step" in result.stdout
