"""The LightningModule: a built model, its freeze plan and optimizer config; steps and metrics."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from finetune.freezing import FreezePlan, keep_eval
from finetune.optim import build_optimizer, build_scheduler


def split_outputs(output: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, auxiliary logits): inception_v3 / googlenet return a tuple in training."""
    if isinstance(output, tuple):
        return output[0], [aux for aux in output[1:] if aux is not None]
    return output, []


class FinetuneModule(pl.LightningModule):
    """Thin: receives the built model and the plan; parses no config."""

    def __init__(self, model: nn.Module, num_classes: int, freeze: FreezePlan, optim: Any,
                 sched: Any, label_smoothing: float = 0.0, aux_weight: float = 0.4) -> None:
        super().__init__()
        self.model = model
        self.freeze_plan, self.optim_cfg, self.sched_cfg = freeze, optim, sched
        self.label_smoothing, self.aux_weight = label_smoothing, aux_weight
        metrics: dict[str, Any] = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.last_confusion: torch.Tensor | None = None
        self.last_predictions: list[int] = []  # argmax per validation image, in loader order
        self._predictions: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_outputs(self.model(x))[0]

    def train(self, mode: bool = True) -> FinetuneModule:
        # Frozen BatchNorm must stay in eval mode through every train()/eval() switch
        # (Lightning calls train() again after each validation).
        super().train(mode)
        if mode:
            keep_eval(self.model, self.freeze_plan.eval_modules)
        return self

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        logits, aux = split_outputs(self.model(x))
        loss = self._loss(logits, y)
        for aux_logits in aux:
            loss = loss + self.aux_weight * self._loss(aux_logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._predictions = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._predictions.append(logits.argmax(dim=1))  # stays on device: no sync per step
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True,
                 batch_size=len(y))
        self.val_metrics.update(logits, y)
        self.confusion.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        self.last_confusion = self.confusion.compute().cpu()
        self.confusion.reset()
        if self._predictions:
            self.last_predictions = torch.cat(self._predictions).cpu().tolist()

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.sched_cfg, self.trainer.max_epochs or 1,
                                    int(self.trainer.estimated_stepping_batches))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
