"""A study's job reports to its trial and is pruned: the trial opened from the study's
storage, and the Lightning callback that reports each epoch's metric and stops a trial the
pruner gives up on (sweep=optuna, docs/sweeps.md)."""

from __future__ import annotations

import logging
import math
import socket
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from finetune.sweeps import study
from finetune.sweeps.study import (
    DEFAULT_NAME,
    JOB,
    make_pruner,
    monitored,
    open_storage,
    storage_url,
    trial_of,
)

log = logging.getLogger("finetune")


class PruneTrial(pl.Callback):
    """Reports `monitor` to the trial after each validation (step = the epoch) and, when the
    study's pruner says so, ends training there: the run finishes as usual, `pruned` holds
    the epochs it trained, and the trial is marked so for the sweeper to tell PRUNED."""

    def __init__(self, open_trial: Any, monitor: str, max_epochs: int) -> None:
        self.open_trial, self.monitor, self.max_epochs = open_trial, monitor, max_epochs
        self.trial: Any = None
        self.pruned: dict[str, Any] | None = None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        epoch = trainer.current_epoch
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)):
                if self.trial is None:
                    self.trial = self.open_trial()
                self.trial.report(float(value), step=epoch)
                prune = epoch + 1 < self.max_epochs and self.trial.should_prune()
                if prune:
                    self.trial.set_user_attr(study.PRUNED, epoch + 1)
        prune = bool(trainer.strategy.broadcast(prune))
        if prune:
            self.pruned = {"epoch": epoch + 1, "of": self.max_epochs, "metric": self.monitor,
                           "value": round(float(trainer.callback_metrics[self.monitor]), 6)
                           if self.monitor in trainer.callback_metrics else None}
            log.info("study: trial pruned after epoch %d of %d (%s below what the pruner "
                     "keeps)", epoch + 1, self.max_epochs, self.monitor)
            trainer.should_stop = True

    def summary(self) -> dict[str, Any] | None:
        return self.pruned


def job_trial(cfg: Any, sweep_dir: Path, run_dir: Path) -> Any:
    """The trial this job runs (`sweep.trial`), opened from the study's storage, with the
    job's host and run dir recorded on it."""
    import optuna  # lazy: an optional extra (finetune[optuna]), needed by a study's job only

    storage = open_storage(storage_url(cfg.sweep.storage, sweep_dir))
    study = optuna.load_study(storage=storage, study_name=cfg.sweep.study_name or DEFAULT_NAME,
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=make_pruner(cfg.sweep.pruner))
    trial = trial_of(study, storage, int(cfg.sweep.trial))
    trial.set_user_attr(JOB, {"host": socket.gethostname(), "dir": str(run_dir.resolve())})
    return trial


def pruning_callback(cfg: Any, sweep_dir: Path | None, run_dir: Path) -> Any | None:
    """The Lightning callback that reports to this job's trial (None: not a study's job)."""
    if cfg.sweep.trial is None or sweep_dir is None:
        return None
    return PruneTrial(lambda: job_trial(cfg, sweep_dir, run_dir), monitored(cfg.metric),
                      int(cfg.trainer.max_epochs))
