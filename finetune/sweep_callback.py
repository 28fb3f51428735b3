"""A sweep says where it writes before its first job, and ends with its leaderboard.

A Hydra callback (conf/config.yaml, hydra.callbacks): on_multirun_start prints the sweep dir;
on_multirun_end, after every job returned (on this machine, whatever the launcher), writes and
prints the leaderboard of finetune.report. Imports nothing heavy until the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"finetune: sweep -> {sweep_dir}/<job>  (while it runs: python -m "
              f"finetune.report {sweep_dir})", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from finetune.errors import FinetuneError
        from finetune.report import print_leaderboard, report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            result = report(sweep_dir, str(config.get("metric") or ""))
        except FinetuneError as err:
            print(f"finetune: the sweep in {sweep_dir} has no leaderboard: {err}", flush=True)
            return
        print(f"finetune: sweep done: {sweep_dir}", flush=True)
        print_leaderboard(result)
