"""task=detection (being built): boxes of the data's classes in each image, found by a
torchvision detector (finetune/models/detectors.py), measured by COCO mean average precision
(torchmetrics' MeanAveragePrecision on the faster-coco-eval backend).

Not yet an entry of `TASKS`: it joins the table when the plan builds detectors and reads box
data (docs/architecture.md); until then a recipe cannot name it. Torch-free at import.
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

    def metrics(self) -> tuple[str, ...]:
        return MAP_METRICS

    def metric_set(self, num_classes: int) -> dict[str, Any]:
        # lazy: keeps torch off a torch-free path
        from torchmetrics.detection import MeanAveragePrecision

        return {"map": MeanAveragePrecision(iou_type="bbox", class_metrics=True,
                                            backend="faster_coco_eval")}

    def loss(self, logits: Any, target: Any, weight: Any = None,
             label_smoothing: float = 0.0) -> Any:
        """The sum of the detector's own losses (it computes them from the targets)."""
        return sum(logits.values())
