"""task=detection: boxes of the data's classes in each image, found by a torchvision detector
(finetune/models/detectors.py; the plan builds it in finetune/training/detection_plan.py),
measured by COCO mean average precision (torchmetrics' MeanAveragePrecision on the
faster-coco-eval backend). Torch-free at import.
"""

from __future__ import annotations

from typing import Any

from finetune.tasks.base import Task

# What validation measures (val/ + the metric's own keys); per-class AP is kept apart.
MAP_METRICS = ("val/map", "val/map_50", "val/map_75", "val/mar_100")


class Detection(Task):
    """Boxes and their classes; the monitored metric is val/map (higher is better)."""

    name = "detection"
    loss_weights = ""  # the detector weighs its own losses
    reads = "boxes"
    model_kind = "detector"
    headline = "val/map"
    page = "docs/detection.md"  # where its refusals send a reader
    # the AP per class a run's summary and evaluation lead with: the metric's key of it
    per_class_key = "val/map_per_class"

    def metrics(self) -> tuple[str, ...]:
        return MAP_METRICS

    def scalars(self, result: dict[str, Any]) -> dict[str, Any]:
        """The figures of a validation worth logging, by the names this task monitors."""
        return {k: v for k, v in result.items() if k in self.metrics()}

    def metric_found(self, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The detector's output as the metric takes it."""
        return found

    def counts_classes_early(self) -> bool:
        return False  # the classes are in the annotation files: the pre-flight check counts

    def problems(self, cfg: Any) -> list[str]:
        """The keys of class-label training that mean nothing for boxes, one sentence each
        (a silent no-op would let a user believe they changed the run)."""
        data, found = cfg.data, []
        refused = {
            "head.type=none": cfg.head.type == "none",
            f"head.hidden={list(cfg.head.hidden)}": bool(cfg.head.hidden),
            f"head.dropout={cfg.head.dropout}": bool(cfg.head.dropout),
            f"loss.label_smoothing={cfg.loss.label_smoothing}": bool(cfg.loss.label_smoothing),
            f"loss.class_weights={cfg.loss.get('class_weights')}":
                cfg.loss.get("class_weights") not in (None, []),
            "data.mix": bool(data.mix.mixup_alpha or data.mix.cutmix_alpha),
            "data.sampler=balanced": data.get("sampler") == "balanced",
            f"data.test_fraction={data.get('test_fraction')}": bool(data.get("test_fraction")),
            f"data.folds={data.get('folds')}": data.get("folds") is not None,
            "data.limit_per_class": bool(data.get("limit_per_class")),
            "sched.name=plateau": cfg.sched.name == "plateau",
            f"freeze.cache={cfg.freeze.cache}": cfg.freeze.cache is True
                or str(cfg.freeze.cache).lower() == "true",
        }
        found += [f"{key}: not taken with task={self.name} (the detector has its own class "
                  "layers and losses, and the feature cache and these data keys serve "
                  f"class labels); remove it ({self.page})"
                  for key, given in refused.items() if given]
        return found

    def metric_set(self, num_classes: int) -> dict[str, Any]:
        # lazy: keeps torch off a torch-free path
        from torchmetrics.detection import MeanAveragePrecision

        return {"map": MeanAveragePrecision(iou_type=("bbox", "segm") if self.instance_masks
                                            else "bbox",
                                            class_metrics=True, backend="faster_coco_eval")}

    def loss(self, logits: Any, target: Any, weight: Any = None,
             label_smoothing: float = 0.0) -> Any:
        """The sum of the detector's own losses (it computes them from the targets)."""
        return sum(logits.values())

    def val_prediction_table(self, items: list[str], labels: list[Any], kept: list[Any],
                             finished: dict[str, Any], names: list[str]
                             ) -> tuple[list[str], list[list[Any]]]:
        """One row per box the final validation found (score, class, x1,y1,x2,y2 in the
        image's pixels), best first within each image."""
        # lazy: keeps torch off a torch-free path
        from finetune.models.detectors import LABEL_OFFSET

        rows = []
        for item, found in zip(items, kept, strict=True):
            order = found["scores"].argsort(descending=True).tolist()
            for i in order:
                label = int(found["labels"][i]) - LABEL_OFFSET
                rows.append([item, names[label] if 0 <= label < len(names) else str(label),
                             round(float(found["scores"][i]), 4),
                             *(round(float(v), 1) for v in found["boxes"][i].tolist())])
        return ["item", "predicted", "score", "x1", "y1", "x2", "y2"], rows
