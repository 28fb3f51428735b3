"""The LightningModule: a built model, its freeze plan and optimizer config; steps and metrics."""

from __future__ import annotations

import logging
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

from finetune.freezing import FreezePlan, apply_stage, keep_eval
from finetune.optim import Schedule, build_scheduler, group_specs, param_groups, stage_groups
from finetune.registry import make_optimizer
from finetune.seeding import seed_epoch

log = logging.getLogger("finetune")


def split_outputs(output: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, auxiliary logits): inception_v3 / googlenet return a tuple in training."""
    if isinstance(output, tuple):
        return output[0], [aux for aux in output[1:] if aux is not None]
    return output, []


class FinetuneModule(pl.LightningModule):
    """Thin: receives the built model and the plan; parses no config."""

    def __init__(self, model: nn.Module, num_classes: int, freeze: FreezePlan, optim: Any,
                 sched: Any, label_smoothing: float = 0.0, aux_weight: float = 0.4,
                 seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.freeze_plan, self.optim_cfg, self.sched_cfg = freeze, optim, sched
        self.seed = seed
        # Stages of the freeze plan begun so far (1 = the start); saved in checkpoints.
        self.stages = freeze.stages_until(0)
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
        self._val_loss, self._val_count = torch.zeros(()), 0
        self._predictions: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_outputs(self.model(x))[0]

    def train(self, mode: bool = True) -> FinetuneModule:
        # Frozen BatchNorm must stay in eval mode through every train()/eval() switch
        # (Lightning calls train() again after each validation).
        super().train(mode)
        if mode:
            keep_eval(self.model, self.freeze_plan.stages[self.stages - 1].eval_modules)
        return self

    # -- the freeze schedule ----------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        # Every random stream restarts from (seed, epoch): a resumed run draws what the
        # uninterrupted run drew (dropout here; data order and augmentation in the data).
        seed_epoch(self.seed, self.current_epoch)
        due = self.freeze_plan.stages_until(self.current_epoch)
        while self.stages < due:
            self._begin_stage(self.stages)
        for group in self.trainer.optimizers[0].param_groups:
            self.log(f"lr-{group['name']}", group["lr"], on_step=False, on_epoch=True)

    def _begin_stage(self, index: int) -> None:
        """Unfreeze a phase's modules and add their named groups to the running optimizer."""
        optimizer = self.trainer.optimizers[0]
        taken = {g["name"] for g in optimizer.param_groups}
        specs = group_specs(self.model, self.optim_cfg.get("groups"))
        groups = stage_groups(self.model, self.optim_cfg, self.freeze_plan, index, specs, taken)
        stage = apply_stage(self.model, self.freeze_plan, index + 1)
        self.stages = index + 1
        self._schedule().add_groups(groups)  # scheduled from their first step
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        joined = ", ".join(f"{g['name']} lr {g['lr']:.3g}" for g in optimizer.param_groups[
            -len(groups):])
        log.info("unfreeze at epoch %d: %s -> %d more parameter tensors train (%s); now %s of "
                 "%s parameters trainable (%.1f%%)", stage.epoch, stage.selector,
                 len(stage.params), joined, f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)

    def _schedule(self) -> Schedule:
        return self.trainer.lr_scheduler_configs[0].scheduler  # type: ignore[return-value]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["finetune"] = {"stages": self.stages,
                                  "groups": [g["name"] for g in
                                             self.trainer.optimizers[0].param_groups]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before configure_optimizers: the optimizer is rebuilt with the groups it saved.
        saved = checkpoint.get("finetune", {})
        self.stages = int(saved.get("stages", self.stages))
        apply_stage(self.model, self.freeze_plan, self.stages)

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
        self._val_loss = torch.zeros((), device=self.device)
        self._val_count = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._predictions.append(logits.argmax(dim=1))  # stays on device: no sync per step
        loss = F.cross_entropy(logits, y)
        self._val_loss = self._val_loss + loss.detach() * len(y)
        self._val_count += len(y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.val_metrics.update(logits, y)
        self.confusion.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        self.last_confusion = self.confusion.compute().cpu()
        self.confusion.reset()
        if self._predictions:
            self.last_predictions = torch.cat(self._predictions).cpu().tolist()
        if self._trainer is not None and self._val_count and not self.trainer.sanity_checking \
                and self.trainer.lr_scheduler_configs:
            loss = self.trainer.strategy.reduce(self._val_loss / self._val_count, reduce_op="mean")
            self._schedule().observe(float(loss))

    def configure_optimizers(self) -> Any:
        apply_stage(self.model, self.freeze_plan, self.stages)
        optimizer = make_optimizer(self.optim_cfg, param_groups(
            self.model, self.optim_cfg, self.freeze_plan, self.stages))
        scheduler = build_scheduler(optimizer, self.sched_cfg, self.trainer.max_epochs or 1,
                                    int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
