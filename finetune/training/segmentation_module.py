"""The LightningModule's validation for a segmentation model: the training step is the
FinetuneModule's (the task's cross-entropy over labelled pixels, plus loss.aux_weight x the
auxiliary head's where the model has one); validation fills one confusion matrix over the
pixels (torchmetrics', summed across DDP ranks) and logs mIoU, pixel accuracy and Dice from
it, and keeps each image's own pixel accuracy and mIoU for the run dir (the report's worst
images). Freezing, schedules, groups, the loss guard and DDP's rank check are the
FinetuneModule's own."""

from __future__ import annotations

from typing import Any

import torch

from finetune.tasks.segmentation import image_scores, scores
from finetune.training.lightning_module import FinetuneModule


class SegmenterModule(FinetuneModule):
    """A FinetuneModule whose validation measures pixels."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor],  # type: ignore[override]
                        batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = self.task.loss(logits, y)
        self.val_metrics.update(logits, y)
        self._predictions.append(image_scores(logits.detach(), y))
        self._val_loss = self._val_loss + loss.detach() * len(y)
        self._val_count += len(y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        confusion = self.val_metrics.compute()["val/confusion"]
        self.val_metrics.reset()
        found = scores(confusion)
        self.log_dict({f"val/{k}": found[k].float() for k in ("miou", "pixel_acc", "dice")},
                      prog_bar=True, sync_dist=True)
        self.last_confusion = confusion.cpu()
        if self._predictions:
            kept = torch.cat(self._predictions).to(self.device)
            if self.trainer.world_size > 1:  # rank r validated the items r, r + W, ...
                gathered = self.all_gather(kept)
                kept = gathered.transpose(0, 1).reshape(-1, kept.shape[1])
                data = getattr(self.trainer, "datamodule", None)  # (padded to a multiple of W)
                kept = kept[:len(data.val_set)] if data is not None else kept
            self.last_predictions = kept.cpu().tolist()
        if self._val_count and not self.trainer.sanity_checking \
                and self.trainer.lr_scheduler_configs:
            loss = self.trainer.strategy.reduce(self._val_loss / self._val_count,
                                                reduce_op="mean")
            self.trainer.lr_scheduler_configs[0].scheduler.observe(  # type: ignore[union-attr]
                float(loss))

    def summary(self, names: list[str]) -> dict[str, Any]:
        """IoU per class at the last validation (null: the class was neither in the masks
        nor predicted)."""
        if self.last_confusion is None:
            return {}
        iou = scores(self.last_confusion)["iou"].tolist()
        return {"val/iou_per_class": {n: (round(v, 6) if v == v else None)
                                      for n, v in zip(names, iou, strict=True)}}
