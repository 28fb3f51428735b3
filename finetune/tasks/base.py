"""What a task owns: how its labels are read and checked, the loss, the metrics and the monitored
one, what validation keeps per image, what a finished run records, what predict returns and
writes, what export says of the outputs, and whether the run's splits are evaluated.

A task is one small object in the `TASKS` table (finetune/tasks/table.py), named by `task:`.
The module imports no torch: `task` choices are checked at compose time; the methods that
compute import what they need.
"""

from __future__ import annotations

from typing import Any

from finetune.data.formats import DataFormat

# The metrics every task logs after each validation (a task adds its own).
COMMON_METRICS = ("val/loss", "val/acc", "val/f1", "best/val/acc")


def watched(cfg: Any) -> list[tuple[str, str]]:
    """(key, metric) for each metric the run is told to watch: `metric`, and early stopping's
    monitor when it is on."""
    found = [("metric", cfg.metric)]
    if cfg.trainer.early_stopping.patience is not None:
        found.append(("trainer.early_stopping.monitor", cfg.trainer.early_stopping.monitor))
    return found


class Task:
    """One kind of labels and predictions; the base holds what every task shares."""

    name = ""
    # the loss key whose weights the manifest records (loss.class_weights | loss.pos_weight)
    loss_weights = "class_weights"
    # metrics this task measures beyond COMMON_METRICS, e.g. val/mAP
    extra_metrics: tuple[str, ...] = ()
    # whether the finished run's val and test splits get finetune's per-class evaluation
    # (evaluation.json, the report's per-class table) and finetune.evaluate applies
    evaluates = False
    # what it reads from the data (a data format's `holds`): class labels, or boxes
    reads = "labels"
    # the model it trains: a classifier (logits per image) or a detector (boxes per image);
    # the plan builds it and the run picks the LightningModule by it
    model_kind = "classifier"
    # the metric a finished run's summary leads with (and ranks its best epoch by)
    headline = "val/acc"
    # whether its model finds each object's mask (instance segmentation: a Mask R-CNN)
    instance_masks = False
    # what its confusion matrix counts, and the name of that matrix's accuracy
    counted, accuracy = "images", "val/acc"

    def metrics(self) -> tuple[str, ...]:
        """The metrics a run of this task can monitor (`metric=`, early stopping)."""
        return (*COMMON_METRICS, *self.extra_metrics)

    def problems(self, cfg: Any) -> list[str]:
        """What this task does not take from the composed config, one sentence each."""
        return []

    def monitored_problems(self, cfg: Any, num_classes: int) -> list[str]:
        """Metrics the run is told to watch that this task will not measure with
        `num_classes` classes."""
        return [f"{key}={name}: not measured with task={self.name}; use one of "
                f"{', '.join(m for m in self.metrics() if m != 'best/val/acc')}"
                for key, name in watched(cfg) if name not in self.metrics()]

    def counts_classes_early(self) -> bool:
        """Whether the torch-free check may count classes from the data format's folders or
        rows (head.num_classes against the data)."""
        return True

    def read(self, data_format: DataFormat, cfg: Any, crop: int, seed: int) -> tuple[Any, ...]:
        """(labelled set, own val set or None, class names, own test set or None)."""
        return data_format.read(cfg, crop, seed)

    def loss_weights_of(self, setting: Any, counts: list[int], total: int,
                        names: list[str]) -> list[float] | None:
        """The training loss's weights from the loss config's `loss_weights` key."""
        raise NotImplementedError(self.name)

    # -- what the LightningModule asks (tensors in, tensors out) ---------------------------

    def metric_set(self, num_classes: int) -> dict[str, Any]:
        """torchmetrics by name, logged as val/<name> after each validation."""
        raise NotImplementedError(self.name)

    def confusion(self, num_classes: int) -> Any:
        """A confusion-matrix metric (None: the task has none)."""
        return None

    def loss(self, logits: Any, target: Any, weight: Any = None,
             label_smoothing: float = 0.0) -> Any:
        raise NotImplementedError(self.name)

    def metric_target(self, target: Any) -> Any:
        """The labels as the metrics take them."""
        return target

    def kept(self, logits: Any) -> Any:
        """What validation keeps per image for the run dir (gathered across ranks)."""
        raise NotImplementedError(self.name)

    # -- what a finished run records ------------------------------------------------------

    def finish(self, kept: list[Any], labels: list[Any], names: list[str]) -> dict[str, Any]:
        """What the task adds to metrics.json and the manifest after fit (e.g. thresholds)."""
        return {}

    def shown(self, label: Any, names: list[str]) -> str:
        """A label (or a kept prediction) as text in val_predictions.csv."""
        raise NotImplementedError(self.name)

    def decided(self, kept: Any, finished: dict[str, Any], names: list[str]) -> Any:
        """The prediction a kept output stands for (the label val_predictions.csv shows)."""
        return kept

    def val_prediction_table(self, items: list[str], labels: list[Any], kept: list[Any],
                             finished: dict[str, Any], names: list[str]
                             ) -> tuple[list[str], list[list[Any]]]:
        """val_predictions.csv: header and rows (here one per image: item, true label and
        the label its kept output decides)."""
        return ["item", "label", "predicted"], [
            [item, self.shown(labels[i], names),
             self.shown(self.decided(k, finished, names), names)]
            for i, (item, k) in enumerate(zip(items, kept, strict=True))]

    # -- what a run dir's users see -------------------------------------------------------

    def predict(self, logits: Any, classes: list[str], topk: int, manifest: Any
                ) -> list[dict[str, Any]]:
        """One row per image: `labels` and `probs` (what finetune.predict returns)."""
        raise NotImplementedError(self.name)

    def prediction_table(self, rows: list[dict[str, Any]], classes: list[str]
                         ) -> tuple[list[str], list[list[Any]]]:
        """The CSV predict writes: header and rows."""
        raise NotImplementedError(self.name)

    def export_outputs(self, manifest: Any) -> dict[str, Any]:
        """How to read the exported model's outputs (export's info file)."""
        return {}
