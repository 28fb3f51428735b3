"""The LightningModule's steps for a detector: in training the model computes its own losses
from the targets (classifier, box regression, RPN objectness...), each logged; in
validation it finds boxes (and masks), and the task's metric (COCO mAP of boxes, and of masks
for instance segmentation) measures them. Freezing, the
unfreeze schedule, optimizer groups, the loss guard and DDP's rank check are the
FinetuneModule's own."""

from __future__ import annotations

from typing import Any

import torch

from finetune.models.detectors import LABEL_OFFSET
from finetune.training.lightning_module import FinetuneModule

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


class DetectorModule(FinetuneModule):
    """A FinetuneModule whose batches are lists of images and targets (data/box_datasets)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # AP per class (its index in the class names) at the last validation, of the
        # classes the validation saw (in its boxes or the predictions)
        self.per_class_ap: dict[int, float] = {}

    def forward(self, images: list[torch.Tensor]) -> Any:  # type: ignore[override]
        return self._forward(images)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        images, targets = batch
        losses = self._forward(images, targets)
        loss = self.task.loss(losses, targets)
        size = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=size,
                     sync_dist=True)  # once an epoch: every rank's share
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._predictions = []

    def validation_step(self, batch: Batch, batch_idx: int) -> None:  # type: ignore[override]
        images, targets = batch
        found = self._forward(images)
        self.val_metrics.update(self.task.metric_found(found), targets)
        # the boxes are kept for val_predictions.csv; masks (image-sized each) are not
        self._predictions.extend(
            {k: v.detach().cpu() for k, v in f.items() if k != "masks"} for f in found)

    def on_validation_epoch_end(self) -> None:
        result = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(self.task.scalars(result), prog_bar=True, sync_dist=True)
        per_class, classes = result.get(self.task.per_class_key), result.get("val/classes")
        self.per_class_ap = {} if per_class is None or classes is None else {
            int(c) - LABEL_OFFSET: float(v) for c, v in zip(
                classes.reshape(-1).tolist(), per_class.reshape(-1).tolist(), strict=True)}
        self.last_predictions = self._gathered(self._predictions)

    def _gathered(self, predictions: list[dict[str, torch.Tensor]]
                  ) -> list[dict[str, torch.Tensor]]:
        """Every rank's boxes in the validation set's order: DistributedSampler (no shuffle)
        gave rank r the items r, r + W, ... (padded with repeats to a multiple of W)."""
        if self._trainer is None or self.trainer.world_size <= 1 \
                or not torch.distributed.is_initialized():
            return predictions
        shares: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(shares, predictions)
        joined = [share[i] for i in range(max(len(s) for s in shares)) for share in shares
                  if i < len(share)]
        data = getattr(self.trainer, "datamodule", None)
        return joined[:len(data.val_set)] if data is not None else joined

    def summary(self, names: list[str]) -> dict[str, Any]:
        """AP per class at the last validation (-1: the class had no boxes there): of the
        masks when the task finds masks."""
        key = "val/mask_ap_per_class" if self.task.instance_masks else "val/ap_per_class"
        return {key: {names[c]: round(v, 6) for c, v in sorted(self.per_class_ap.items())
                      if 0 <= c < len(names)}}
