"""Shared by the bench scripts: the machine, medians, a framework run, the same data."""

from __future__ import annotations

import atexit
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model and cores, and the GPU when there is one."""
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


def median(values: list[float]) -> float:
    return statistics.median(values)


IN_PROCESS_ENV = "FINETUNE_BENCH_IN_PROCESS"  # smoke runs in the test suite: finetune.train


def framework_run(overrides: list[str]) -> dict[str, Any]:
    """`python -m finetune OVERRIDES` in a fresh run dir, as a user runs it (figures include
    nothing of this process); its metrics.json and the run dir. With $FINETUNE_BENCH_IN_PROCESS
    set (the suite's smoke runs: they check the script, not speed), finetune.train in this
    process instead."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    atexit.register(shutil.rmtree, run_dir, True)  # read until the script ends, then gone
    if os.environ.get(IN_PROCESS_ENV):
        import finetune

        recipe = next((o.partition("=")[2] for o in overrides if o.startswith("recipe=")),
                      "base")
        result = finetune.train(recipe, [o for o in overrides if not o.startswith("recipe=")]
                                + ["trainer.enable_progress_bar=false"], run_dir=run_dir)
        return {**result.metrics, "run_dir": str(run_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "finetune", *overrides, "trainer.enable_progress_bar=false",
         f"hydra.run.dir={run_dir}"],
        cwd=run_dir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"framework run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["run_dir"] = str(run_dir)
    return metrics


def framework_losses(run_dir: str) -> dict[int, float]:
    """Global step -> logged training loss."""
    with open(Path(run_dir) / "metrics.csv", newline="") as handle:
        return {int(r["step"]): float(r["train/loss_step"]) for r in csv.DictReader(handle)
                if r.get("train/loss_step")}


def report(title: str, header: list[str], rows: list[list[Any]], out: Path | None) -> str:
    """A Markdown table, printed, and appended to `out` when given."""
    lines = [f"### {title}", "", f"machine: {machine()}", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out is not None:
        with open(out, "a") as handle:
            handle.write(text + "\n")
    return text
