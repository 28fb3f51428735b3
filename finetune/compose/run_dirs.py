"""The run and sweep dirs Hydra will really write, checked as resolved values.

The gate (finetune/compose/gate.py) reads a recipe's `hydra.run.dir` as text; this checks what
that text becomes once Hydra resolves it (`${now:...}` included), before Hydra writes anything:
a Hydra callback (conf/config.yaml, hydra.callbacks) refuses a run dir or sweep dir outside
the working directory at the start of the run or sweep, and each job's dir again as it starts.
A dir the person typed on the command line (`hydra.run.dir=...`) is theirs and not checked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.errors import ConfigError, print_problems


def outside_problem(key: str, value: Any, cwd: Path | None = None) -> str | None:
    """Why the resolved dir `value` of `key` may not be written (None: it is inside `cwd`)."""
    base = os.path.normpath(os.path.abspath(cwd or Path.cwd()))
    path = os.path.normpath(os.path.join(base, os.path.expanduser(str(value))))
    if path == base or path.startswith(base + os.sep):
        return None
    return (f"{key} resolves to {path}, outside the working directory {base}; a recipe or run "
            "dir names its run dir inside it (type hydra.run.dir=... on the command line to "
            "write elsewhere)")


def typed(config: DictConfig, key: str) -> bool:
    """Whether the person set `key` (or a key under it) on the command line."""
    overrides = config.hydra.overrides.get("hydra") or []
    return any(str(o).lstrip("+").partition("=")[0] in (key, *_parents(key)) for o in overrides)


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _refuse(problems: list[str]) -> None:
    if problems:
        print_problems(ConfigError(problems))
        raise SystemExit(2)


class RunDirCheck(Callback):
    """Refuses a resolved run, sweep or job dir outside the working directory."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not typed(config, "hydra.run.dir"):
            _refuse([p for p in [outside_problem("hydra.run.dir", config.hydra.run.dir)] if p])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not typed(config, "hydra.sweep.dir"):
            _refuse([p for p in [outside_problem("hydra.sweep.dir", config.hydra.sweep.dir)]
                     if p])

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # the second look, with the job's own dir (a sweep's subdir resolves per job)
        keys = ("hydra.sweep.dir", "hydra.sweep.subdir") \
            if config.hydra.mode.name == "MULTIRUN" else ("hydra.run.dir",)
        if not any(typed(config, k) for k in keys):
            _refuse([p for p in [outside_problem(keys[-1], config.hydra.runtime.output_dir)]
                     if p])
