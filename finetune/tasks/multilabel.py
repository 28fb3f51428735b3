"""task=multilabel: any set of labels per image, a sigmoid per label, binary cross-entropy; each
label's decision threshold tuned on the final validation."""

from __future__ import annotations

from typing import Any

from finetune.compose.schema import mix_enabled
from finetune.data.formats import DataFormat, label_sets_problem
from finetune.errors import FinetuneError
from finetune.tasks.base import Task
from finetune.tasks.classification import given_weights

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # a label's threshold: one of these


class Multilabel(Task):
    """Label sets: a label is predicted when its probability reaches its threshold."""

    name = "multilabel"
    loss_weights = "pos_weight"
    extra_metrics = ("val/mAP",)

    def problems(self, cfg: Any) -> list[str]:
        problems = []
        if cfg.loss.class_weights is not None:
            problems.append("loss.class_weights is for one class per image; with "
                            "task=multilabel weigh each label's positives with "
                            "loss.pos_weight (auto or a list)")
        if cfg.data.sampler == "balanced":
            problems.append("data.sampler=balanced draws classes equally, which label sets do "
                            "not have; with task=multilabel use loss.pos_weight=auto")
        if cfg.data.get("limit_per_class"):
            problems.append("data.limit_per_class counts images of one class; it does not "
                            "apply to task=multilabel")
        if mix_enabled(cfg.data):
            problems.append("data.mix (MixUp / CutMix) is not supported with task=multilabel "
                            "yet: drop it")
        if cfg.loss.label_smoothing:
            problems.append("loss.label_smoothing is for one class per image; it does not "
                            "apply to task=multilabel")
        if cfg.trainer.early_stopping.patience is not None and \
                cfg.trainer.early_stopping.monitor == "val/acc_top5":
            problems.append("trainer.early_stopping.monitor=val/acc_top5 is not measured with "
                            "task=multilabel; monitor val/loss, val/acc or val/f1")
        if cfg.metric == "val/acc_top5":
            problems.append("metric=val/acc_top5 is not measured with task=multilabel; use "
                            "val/mAP")
        problem = label_sets_problem(cfg.data.name)
        return problems + ([problem] if problem else [])

    def monitored_problems(self, cfg: Any, num_classes: int) -> list[str]:
        return []  # (problems says what multilabel does not measure, before torch)

    def counts_classes_early(self) -> bool:
        return False  # label names come from the label sets, read with the data

    def read(self, data_format: DataFormat, cfg: Any, crop: int, seed: int) -> tuple[Any, ...]:
        """The label sets of the formats that have them (csv, digits); no own val or test."""
        problem = label_sets_problem(cfg.name)
        if problem:
            raise FinetuneError(problem)
        full, names = data_format.read_label_sets(cfg)
        return full, None, names, None

    def loss_weights_of(self, setting: Any, counts: list[int], total: int,
                        names: list[str]) -> list[float] | None:
        """loss.pos_weight per label: `auto` is negatives / positives in the training split
        (a label never positive gets 1.0); a list is taken as given."""
        if setting == "auto":
            return [round((total - n) / n, 6) if n else 1.0 for n in counts]
        return given_weights(setting, names, "loss.pos_weight")

    def metric_set(self, num_classes: int) -> dict[str, Any]:
        # lazy: keeps torch off a torch-free path (the table is read at compose time)
        from torchmetrics.classification import (
            MultilabelAveragePrecision,
            MultilabelExactMatch,
            MultilabelF1Score,
        )

        # val/acc is the exact match of the label set at 0.5
        return {"acc": MultilabelExactMatch(num_classes),
                "f1": MultilabelF1Score(num_classes, average="macro"),
                "f1_micro": MultilabelF1Score(num_classes, average="micro"),
                "mAP": MultilabelAveragePrecision(num_classes, average="macro")}

    def loss(self, logits: Any, target: Any, weight: Any = None,
             label_smoothing: float = 0.0) -> Any:
        # lazy: keeps torch off a torch-free path
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)

    def metric_target(self, target: Any) -> Any:
        return target.long()

    def kept(self, logits: Any) -> Any:
        # lazy: keeps torch off a torch-free path
        import torch

        return torch.sigmoid(logits)  # probabilities per label, for the thresholds

    def finish(self, kept: list[Any], labels: list[Any], names: list[str]) -> dict[str, Any]:
        """Each label's threshold (and its F1) on the images validated last."""
        if not kept:
            return {}
        thresholds, label_f1 = tune_thresholds(kept, labels[:len(kept)])
        return {"thresholds": dict(zip(names, thresholds, strict=True)),
                "val/f1_per_label": dict(zip(names, label_f1, strict=True))}

    def shown(self, label: Any, names: list[str]) -> str:
        return ";".join(n for n, v in zip(names, label, strict=True) if v)

    def decided(self, kept: Any, finished: dict[str, Any], names: list[str]) -> Any:
        cut = finished.get("thresholds", {})
        return tuple(float(p >= cut.get(n, 0.5)) for p, n in zip(kept, names, strict=True))

    def predict(self, logits: Any, classes: list[str], topk: int, manifest: Any
                ) -> list[dict[str, Any]]:
        """The predicted label set (at the thresholds tuned on the run's validation set; 0.5
        where none is recorded) and a probability per label, in class order."""
        # lazy: keeps torch off a torch-free path
        import torch

        recorded = manifest.thresholds if manifest is not None else {}
        cut = torch.tensor([float(recorded.get(c, 0.5)) for c in classes])
        probs = torch.sigmoid(logits).cpu()
        return [{"labels": [c for c, hit in zip(classes, (p >= cut).tolist(), strict=True)
                            if hit], "probs": p.tolist()} for p in probs]

    def prediction_table(self, rows: list[dict[str, Any]], classes: list[str]
                         ) -> tuple[list[str], list[list[Any]]]:
        """path, the predicted label set (`;`-separated), a probability per label."""
        return (["path", "labels", *(f"prob_{c}" for c in classes)],
                [[row["path"], ";".join(row["labels"]), *(round(p, 6) for p in row["probs"])]
                 for row in rows])

    def export_outputs(self, manifest: Any) -> dict[str, Any]:
        return {"outputs": "logits (a sigmoid per label; a label is predicted at its "
                           "threshold)", "thresholds": manifest.thresholds}


def tune_thresholds(probs: list[list[float]], labels: list[tuple[float, ...]]
                    ) -> tuple[list[float], list[float]]:
    """Per label, the decision threshold (0.05, 0.10 ... 0.95) with the best F1 on the final
    validation (ties: the one nearest 0.5), and that F1."""
    # lazy: numpy is slow to import; only a finished multilabel run needs it
    import numpy as np

    p, y = np.asarray(probs), np.asarray(labels) > 0.5
    thresholds, scores = [], []
    for k in range(p.shape[1]):
        f1 = []
        for t in THRESHOLDS:
            predicted = p[:, k] >= t
            tp = float(np.sum(predicted & y[:, k]))
            denominator = float(np.sum(predicted) + np.sum(y[:, k]))
            f1.append(2 * tp / denominator if denominator else 1.0)
        best = max(range(len(THRESHOLDS)), key=lambda i: (f1[i], -abs(THRESHOLDS[i] - 0.5)))
        thresholds.append(float(THRESHOLDS[best]))
        scores.append(round(f1[best], 6))
    return thresholds, scores
