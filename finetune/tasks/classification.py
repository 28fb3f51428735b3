"""task=multiclass: one class per image, a softmax over the classes, cross-entropy."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from finetune.errors import FinetuneError
from finetune.tasks.base import Task, watched


class Multiclass(Task):
    """One class per image: the class with the highest probability is the prediction."""

    name = "multiclass"
    loss_weights = "class_weights"
    extra_metrics = ("val/acc_top5",)
    evaluates = True

    def problems(self, cfg: Any) -> list[str]:
        if cfg.data.get("sampler") == "balanced" and \
                cfg.loss.get("class_weights") not in (None, []):
            return ["loss.class_weights and data.sampler=balanced both correct the same class "
                    "imbalance (the rare classes would count twice over); use one of them "
                    "(docs/training.md, Imbalanced classes)"]
        return []

    def monitored_problems(self, cfg: Any, num_classes: int) -> list[str]:
        return [f"{key}={name}: top-5 accuracy is not measured with {num_classes} classes "
                "(it would always be 1); use val/acc or val/loss"
                for key, name in watched(cfg) if name == "val/acc_top5" and num_classes <= 5] + [
            f"{key}={name}: mean average precision is measured for task=multilabel only; use "
            "val/acc or val/loss" if name == "val/mAP" else
            f"{key}={name}: not measured with task={self.name}; use val/acc or val/loss"
            for key, name in watched(cfg) if name not in self.metrics()]

    def loss_weights_of(self, setting: Any, counts: list[int], total: int,
                        names: list[str]) -> list[float] | None:
        """loss.class_weights: `auto` is inverse frequency in the training split,
        N / (K x n_c) (a balanced set gets 1.0 each); a list is taken as given."""
        if setting == "auto":
            return [round(total / (len(counts) * n), 6) for n in counts]
        return given_weights(setting, names, "loss.class_weights")

    def metric_set(self, num_classes: int) -> dict[str, Any]:
        # lazy: keeps torch off a torch-free path (the table is read at compose time)
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"),
                   "f1": MulticlassF1Score(num_classes, average="macro")}
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        return metrics

    def confusion(self, num_classes: int) -> Any:
        # lazy: keeps torch off a torch-free path
        from torchmetrics.classification import MulticlassConfusionMatrix

        return MulticlassConfusionMatrix(num_classes)

    def loss(self, logits: Any, target: Any, weight: Any = None,
             label_smoothing: float = 0.0) -> Any:
        # lazy: keeps torch off a torch-free path
        import torch.nn.functional as F

        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)

    def kept(self, logits: Any) -> Any:
        return logits.argmax(dim=1)  # on device: no sync per step

    def shown(self, label: Any, names: list[str]) -> str:
        return names[label]

    def predict(self, logits: Any, classes: list[str], topk: int, manifest: Any
                ) -> list[dict[str, Any]]:
        # lazy: keeps torch off a torch-free path
        import torch

        temperature = manifest.temperature if manifest is not None else 1.0
        k = max(1, min(topk, len(classes)))
        top = torch.softmax(logits / temperature, dim=1).topk(k, dim=1)
        return [{"labels": [classes[j] for j in i], "probs": p}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]

    def prediction_table(self, rows: list[dict[str, Any]], classes: list[str]
                         ) -> tuple[list[str], list[list[Any]]]:
        """path, then label1, prob1, label2, prob2 ... (top-k)."""
        k = len(rows[0]["labels"]) if rows else 1
        header = ["path"] + [f"{name}{i}" for i in range(1, k + 1) for name in ("label", "prob")]
        return header, [[row["path"], *[v for pair in zip(
            row["labels"], [round(p, 6) for p in row["probs"]], strict=True) for v in pair]]
            for row in rows]

    def export_outputs(self, manifest: Any) -> dict[str, Any]:
        temperature = manifest.temperature
        return {"outputs": "logits" if temperature == 1.0 else
                f"logits / temperature ({temperature:g}, calibrated: softmax gives calibrated "
                "probabilities)", "temperature": temperature}


def given_weights(setting: Any, names: list[str], key: str) -> list[float]:
    """A list of one number per class (or label), as given."""
    weights = list(setting) if isinstance(setting, list | tuple) or OmegaConf.is_list(
        setting) else None
    if weights is None or len(weights) != len(names) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) for w in weights):
        raise FinetuneError(f"{key}={setting}: give auto, or one number per class "
                            f"({len(names)}: {', '.join(names[:12])})")
    return [float(w) for w in weights]
