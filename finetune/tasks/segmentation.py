"""task=segmentation: a class for every pixel, found by a torchvision segmentation model
(DeepLabv3, FCN, LR-ASPP by name) or by a classifier's feature map under a DeepLabv3 or FCN
head (finetune/models/segmenters.py; the plan builds it in
finetune/training/segmentation_plan.py). Pixels the data marks unlabelled (data.ignore_index)
count nowhere: not in the loss, not in any metric. Measured by the mean intersection over
union of the classes (mIoU), pixel accuracy and Dice, all from one confusion matrix over the
pixels (torchmetrics'). Torch-free at import.
"""

from __future__ import annotations

from typing import Any

from finetune.tasks.base import Task

# The value unlabelled pixels take once read (data.ignore_index is the data's own): the
# cross-entropy's default ignore_index, never a class index however many classes there are.
IGNORED = -100

# What validation measures; val/miou leads and is monitored by default.
MASK_METRICS = ("val/miou", "val/pixel_acc", "val/dice", "val/loss")


def scores(confusion: Any) -> dict[str, Any]:
    """mIoU, pixel accuracy, Dice (and IoU per class) from a confusion matrix over pixels
    (rows: true class, columns: predicted). A class with no pixel in the truth nor in the
    prediction has no IoU (nan) and is left out of the means: a validation set without one
    class neither rewards nor punishes it."""
    # lazy: keeps torch off a torch-free path
    import torch

    matrix = confusion.double()
    hits = matrix.diagonal()
    truth, predicted = matrix.sum(1), matrix.sum(0)
    union = truth + predicted - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
    dice = torch.where(union > 0, 2 * hits / (truth + predicted).clamp(min=1), torch.nan)
    total = matrix.sum()
    return {"miou": iou.nanmean(), "pixel_acc": hits.sum() / total.clamp(min=1),
            "dice": dice.nanmean(), "iou": iou}


def image_scores(logits: Any, target: Any) -> Any:
    """(pixel accuracy, mIoU) of each image of a batch: logits (B, K, H, W), target (B, H, W)
    with unlabelled pixels negative."""
    # lazy: keeps torch off a torch-free path
    import torch

    count, classes = logits.shape[0], logits.shape[1]
    predicted = logits.argmax(1)
    labelled = target >= 0
    which = torch.arange(count, device=target.device).view(-1, 1, 1).expand_as(target)
    index = (which * classes + target.clamp(min=0)) * classes + predicted
    matrices = torch.bincount(index[labelled], minlength=count * classes * classes)
    found = [scores(m) for m in matrices.view(count, classes, classes)]
    return torch.tensor([[float(f["pixel_acc"]), float(f["miou"])] for f in found])


class Segmentation(Task):
    """One class per pixel; the monitored metric is val/miou (higher is better)."""

    name = "segmentation"
    loss_weights = ""
    reads = "masks"
    model_kind = "segmenter"
    headline = "val/miou"
    counted, accuracy = "pixels", "val/pixel_acc"

    def metrics(self) -> tuple[str, ...]:
        return MASK_METRICS

    def counts_classes_early(self) -> bool:
        return False  # the class table (and the background) are the mask format's to say

    def problems(self, cfg: Any) -> list[str]:
        """The keys of image-label training that mean nothing for masks, one sentence each."""
        data = cfg.data
        refused = {
            "head.type=none": cfg.head.type == "none",
            f"head.hidden={list(cfg.head.hidden)}": bool(cfg.head.hidden),
            f"head.dropout={cfg.head.dropout}": bool(cfg.head.dropout),
            f"loss.class_weights={cfg.loss.get('class_weights')}":
                cfg.loss.get("class_weights") not in (None, []),
            "data.mix": bool(data.mix.mixup_alpha or data.mix.cutmix_alpha),
            "data.sampler=balanced": data.get("sampler") == "balanced",
            f"data.test_fraction={data.get('test_fraction')}": bool(data.get("test_fraction")),
            f"data.folds={data.get('folds')}": data.get("folds") is not None,
            "data.limit_per_class": bool(data.get("limit_per_class")),
            "data.uint8_batches=true": str(data.get("uint8_batches")).lower() == "true",
            "freeze.cache=true": cfg.freeze.cache is True
                or str(cfg.freeze.cache).lower() == "true",
            f"adapter.type={cfg.adapter.type}": cfg.adapter.type is not None,
        }
        return [f"{key}: not taken with task=segmentation (the model has its own pixel "
                "classifier; these keys serve one label per image, or are not built for "
                "masks yet); remove it (docs/segmentation.md)"
                for key, given in refused.items() if given]

    def metric_set(self, num_classes: int) -> dict[str, Any]:
        # lazy: keeps torch off a torch-free path
        from torchmetrics.classification import MulticlassConfusionMatrix

        return {"confusion": MulticlassConfusionMatrix(num_classes, ignore_index=IGNORED)}

    def loss(self, logits: Any, target: Any, weight: Any = None,
             label_smoothing: float = 0.0) -> Any:
        """Cross-entropy over the labelled pixels."""
        # lazy: keeps torch off a torch-free path
        from torch.nn import functional

        return functional.cross_entropy(logits, target, weight=weight, ignore_index=IGNORED,
                                        label_smoothing=label_smoothing)

    def export_outputs(self, manifest: Any) -> dict[str, Any]:
        return {"outputs": "class scores per pixel (batch, classes, height, width) at the "
                           "input's size; a pixel's class is the argmax over the classes"}

    def val_prediction_table(self, items: list[str], labels: list[Any], kept: list[Any],
                             finished: dict[str, Any], names: list[str]
                             ) -> tuple[list[str], list[list[Any]]]:
        """One row per validation image: its pixel accuracy and mean IoU."""
        return ["item", "pixel_acc", "miou"], [
            [item, round(float(k[0]), 4), round(float(k[1]), 4) if k[1] == k[1] else ""]
            for item, k in zip(items, kept, strict=True)]
