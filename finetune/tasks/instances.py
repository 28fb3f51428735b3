"""task=instance_segmentation: each object's box, class and mask, found by a Mask R-CNN —
torchvision's by name with its box and mask predictors replaced for the data's classes, or any
classifier's features under one (finetune/models/detectors.py) — and measured by COCO mask
mAP (torchmetrics' MeanAveragePrecision with iou_type segm), box mAP beside it.

Everything else is detection's: the data (COCO with polygons or RLE, or the digit canvases
with each digit's pixels as its mask), the plan, the LightningModule, predict, evaluate,
export and the report. Torch-free at import.
"""

from __future__ import annotations

from typing import Any

from finetune.data.formats import FORMATS
from finetune.tasks.detection import MAP_METRICS, Detection

# What validation measures: mask mAP (monitored) and detection's box figures under their
# names there (val/map is box mAP in both tasks).
# A predicted mask is the pixels whose probability is above this (COCO's and torchvision's
# rule: validation, evaluate, predict and export's parity all read masks so).
MASK_THRESHOLD = 0.5
MASK_MAP_METRICS = ("val/mask_map", "val/mask_map_50", "val/mask_map_75",
                    "val/mask_mar_100", *MAP_METRICS)


class InstanceSegmentation(Detection):
    """Boxes, classes and a mask per object; the monitored metric is val/mask_map."""

    name = "instance_segmentation"
    headline = "val/mask_map"
    instance_masks = True
    page = "docs/instance-segmentation.md"
    per_class_key = "val/segm_map_per_class"

    def metrics(self) -> tuple[str, ...]:
        return MASK_MAP_METRICS

    def scalars(self, result: dict[str, Any]) -> dict[str, Any]:
        """torchmetrics' bbox_* and segm_* figures as val/* and val/mask_*."""
        renamed = {k.replace("val/bbox_", "val/").replace("val/segm_", "val/mask_"): v
                   for k, v in result.items()}
        return {k: v for k, v in renamed.items() if k in self.metrics()}

    def metric_found(self, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mask R-CNN's masks are probabilities (objects, 1, H, W); COCO's are its pixels
        above one half."""
        return [{**f, "masks": f["masks"][:, 0] > MASK_THRESHOLD} if "masks" in f else f
                for f in found]

    def problems(self, cfg: Any) -> list[str]:
        found = super().problems(cfg)
        data_format = FORMATS.get(cfg.data.name)
        if data_format is not None and data_format.holds == "boxes" \
                and not data_format.instance_masks:
            masked = ", ".join(n for n, f in FORMATS.items() if f.instance_masks)
            found.append(f"data={cfg.data.name} holds boxes without masks; task={self.name} "
                         "reads each object's mask too: use data="
                         f"{masked.replace(', ', ' | data=')} (COCO polygons or RLE), or "
                         "task=detection for the boxes alone")
        return found
