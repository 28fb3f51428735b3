"""Where a run's metrics go besides metrics.csv, one small object each, found in one table
(`LOGGERS`), chosen by `logger=` (`logger.name`).

A logger names the package it needs (validate checks it is installed, with the pip extra to
add) and makes its Lightning logger for a run dir. metrics.csv is always written. Adding one
is one class and one entry in LOGGERS (docs/extending.md). The module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.extensions import Table


class RunLogger:
    name = ""
    package: str | None = None  # the import the logger needs; its extra is finetune[<name>]

    def make(self, run_dir: Path) -> list[Any]:
        """The Lightning loggers to add beside the CSV one."""
        return []


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


LOGGERS = Table("logger.name", "finetune.loggers", "logger")
LOGGERS.add(CsvOnly(), TensorBoard(), MLflow())
