"""A sweep says where it writes before its first job, and ends with its leaderboard.

A Hydra callback (conf/config.yaml, hydra.callbacks): on_multirun_start prints the sweep dir (and
tells the jobs which split points the sweep tries: their feature caches share work);
on_multirun_end, after every job returned (on this machine, whatever the launcher), writes and
prints the leaderboard of finetune.report. Imports nothing heavy until the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.errors import FinetuneError
from finetune.locations import SPLITS_ENV
from finetune.sweeps.leaderboard import print_leaderboard, report


def swept_split_points(config: DictConfig) -> list[str]:
    """Every value of freeze.train_from the sweep tries (its command line and
    hydra.sweeper.params), as written; [] when it does not vary it."""

    def of_split(texts: list[str]) -> list[str]:
        return [t for t in texts if t.partition("=")[0].lstrip("+~") == "freeze.train_from"]

    params = config.hydra.sweeper.get("params") or {}
    # the command line's value replaces the search's (as the sweepers do)
    texts = of_split([str(o) for o in config.hydra.overrides.task]) or \
        of_split([f"{k}={v}" for k, v in params.items()])
    found: list[str] = []
    try:
        parsed = OverridesParser.create().parse_overrides(texts)
    except Exception:  # the sweeper reports a bad override itself
        return []
    for override in parsed:
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            and not override.is_interval_sweep() else [override.get_value_element_as_str()]
        found += [v for v in values if v not in found]
    return found


FAILED = ("failed", "interrupted", "unreadable")  # a job status that is not an outcome


def ran_since(job_dir: Path, started: float) -> bool:
    """Whether the job in `job_dir` ran in this sweep process (a study shared with other
    processes or resumed after a crash also lists trials that ran elsewhere or before)."""
    record = job_dir / "metrics.json"
    try:
        return (record if record.is_file() else job_dir).stat().st_mtime >= started
    except OSError:
        return False


class SweepSummary(Callback):
    started = 0.0  # when this process's sweep began (its own jobs ran after it)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        # the jobs' feature caches keep what the other split points start from (an env var:
        # launchers' worker processes inherit it)
        os.environ[SPLITS_ENV] = json.dumps(swept_split_points(config))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"finetune: sweep -> {sweep_dir}/<job>  (while it runs: finetune report "
              f"{sweep_dir})", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            result = report(sweep_dir, str(config.get("metric") or ""))
        except FinetuneError as err:
            print(f"finetune: the sweep in {sweep_dir} has no leaderboard: {err}", flush=True)
            return
        print(f"finetune: sweep done: {sweep_dir}", flush=True)
        print_leaderboard(result)
        failed = [job for job in result["jobs"] if job.status in FAILED
                  and ran_since(job.dir, self.started)]
        if failed:  # a sweep is done only when its jobs are: say which did not, exit 1
            shown = ", ".join(job.dir.name for job in failed[:10])
            print(f"finetune: error: {len(failed)} of {len(result['jobs'])} jobs did not finish "
                  f"({shown}{' ...' if len(failed) > 10 else ''}); each job's dir says why, "
                  "and the leaderboard ranks the others", file=sys.stderr, flush=True)
            raise SystemExit(1)
