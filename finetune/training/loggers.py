"""Where a run's metrics go besides metrics.csv, one small object each, found in one table
(`LOGGERS`), chosen by `logger=` (`logger.name`).

A logger names the package it needs (validate checks it is installed, with the pip extra to
add) and makes its Lightning logger for a run dir. metrics.csv is always written. Adding one
is one class and one entry in LOGGERS (docs/extending.md). The module imports no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.extensions import Table


class RunLogger:
    name = ""
    package: str | None = None  # the import the logger needs; its extra is finetune[<name>]

    def make(self, run_dir: Path) -> list[Any]:
        """The Lightning loggers to add beside the CSV one."""
        return []

    def finish(self, logger: Any, metrics: dict[str, Any]) -> None:
        """After the run: `metrics` is its metrics.json (a logger may record the final
        figures and close what it opened)."""


class CsvOnly(RunLogger):
    name = "csv"


class TensorBoard(RunLogger):
    name = "tensorboard"
    package = "tensorboard"

    def make(self, run_dir: Path) -> list[Any]:
        # lazy: keeps torch off a torch-free path
        from pytorch_lightning.loggers import TensorBoardLogger

        return [TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="")]


class MLflow(RunLogger):
    name = "mlflow"
    package = "mlflow"

    def make(self, run_dir: Path) -> list[Any]:
        # lazy: keeps torch off a torch-free path
        from pytorch_lightning.loggers import MLFlowLogger

        return [MLFlowLogger(experiment_name="finetune",
                             tracking_uri=(run_dir / "mlruns").as_uri())]


class WandB(RunLogger):
    """Weights & Biases, offline unless the person running the command says otherwise: a
    recipe cannot send a run's figures anywhere. `WANDB_MODE=online` in the environment syncs
    as it trains (after `wandb login`); offline, `wandb sync RUN_DIR/wandb/offline-run-*`
    uploads it later. The project is `finetune` (or `WANDB_PROJECT`), the run is named after
    its run dir; no checkpoint is uploaded and the console is not captured (finetune.log has
    it)."""

    name = "wandb"
    package = "wandb"

    def make(self, run_dir: Path) -> list[Any]:
        # lazy: an optional extra (finetune[wandb])
        import wandb

        # lazy: keeps torch off a torch-free path
        from pytorch_lightning.loggers import WandbLogger

        online = os.environ.get("WANDB_MODE") == "online"
        return [WandbLogger(name=run_dir.name, save_dir=run_dir, offline=not online,
                            project=os.environ.get("WANDB_PROJECT", "finetune"),
                            log_model=False, reinit="finish_previous",
                            settings=wandb.Settings(console="off"))]

    def finish(self, logger: Any, metrics: dict[str, Any]) -> None:
        experiment = getattr(logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "summary"):
            return
        experiment.summary.update({k: v for k, v in metrics.items()
                                   if isinstance(v, int | float) and not isinstance(v, bool)})
        experiment.finish()
        # lazy: an optional extra (finetune[wandb])
        import wandb

        # finish() returns once the service has the run's last record, not once its file is
        # closed; tearing the service down waits for that, so the run dir is whole when the
        # run says it is done (a sweep's next job starts a new service).
        wandb.teardown()


LOGGERS = Table("logger.name", "finetune.loggers", "logger")
LOGGERS.add(CsvOnly(), TensorBoard(), MLflow(), WandB())
