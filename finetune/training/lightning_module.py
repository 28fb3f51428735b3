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
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from finetune.registry import make_optimizer
from finetune.seeding import seed_epoch
from finetune.training.freeze_schedule import FreezeSchedule
from finetune.training.freezing import FreezePlan, apply_stage, keep_eval
from finetune.training.guards import LossGuard, RankCheck
from finetune.training.optim import GroupPlan, build_scheduler, plan_groups, torch_groups

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
                 seed: int = 0, channels_last: bool = False, compile: bool = False,
                 groups: list[GroupPlan] | None = None,
                 class_weights: list[float] | None = None, mix: Any = None,
                 multilabel: bool = False) -> None:
        super().__init__()
        self.model = model
        # loss.class_weights: the training loss weighs each class (not saved: the plan
        # computes them again; validation's loss stays unweighted, comparable across runs)
        self.mix = mix  # data.mix: a finetune.mixing.BatchMix on each training batch, or None
        self.register_buffer("class_weight", torch.tensor(class_weights, dtype=torch.float32)
                             if class_weights else None, persistent=False)
        self.freeze_plan, self.optim_cfg, self.sched_cfg = freeze, optim, sched
        # The optimizer groups of every stage, as the plan computed them (RunPlan.groups);
        # computed here only for a module made without a plan.
        self.groups = groups if groups is not None else plan_groups(model, optim, freeze)
        self.seed = seed
        # The unfreeze schedule owns which phases have begun (saved in checkpoints); the
        # module only reads it (train mode, optimizer groups). Added to the Trainer by
        # configure_callbacks, so a module alone is enough to fit.
        self.schedule = FreezeSchedule(model, freeze, self.groups)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # torch.compile wraps the forward only: parameters, state_dict keys and checkpoints
        # stay those of the model (not registered as a submodule).
        object.__setattr__(self, "_forward", torch.compile(model) if compile else model)
        self.compile_forward = compile  # not `compile`: that is nn.Module's method
        # Watching the loss for NaN/inf and, under DDP, the ranks' tensors (finetune/guards.py)
        self.loss_guard, self.rank_check = LossGuard(), RankCheck()
        self.label_smoothing, self.aux_weight = label_smoothing, aux_weight
        # task=multilabel: a sigmoid per label, BCE-with-logits (class_weights are then the
        # labels' pos_weight); val/acc is the exact match of the label set at 0.5
        self.multilabel = multilabel
        metrics: dict[str, Any] = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        } if not multilabel else {
            "acc": MultilabelExactMatch(num_classes),
            "f1": MultilabelF1Score(num_classes, average="macro"),
            "f1_micro": MultilabelF1Score(num_classes, average="micro"),
            "mAP": MultilabelAveragePrecision(num_classes, average="macro"),
        }
        if num_classes > 5 and not multilabel:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.confusion = MulticlassConfusionMatrix(num_classes) if not multilabel else None
        self.last_confusion: torch.Tensor | None = None
        self.last_predictions: list[int] = []  # argmax per validation image, in loader order
        self._val_loss, self._val_count = torch.zeros(()), 0
        self._predictions: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_outputs(self._run(x))[0]

    def _run(self, x: torch.Tensor) -> Any:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def use_features(self, suffix: nn.Module) -> None:
        """Batches now hold the frozen prefix's outputs (the feature cache): steps run the
        suffix, which shares its modules (and so its parameters) with the model."""
        forward = torch.compile(suffix) if self.compile_forward else suffix
        object.__setattr__(self, "_forward", forward)

    def train(self, mode: bool = True) -> FinetuneModule:
        # Frozen BatchNorm must stay in eval mode through every train()/eval() switch
        # (Lightning calls train() again after each validation).
        super().train(mode)
        if mode:
            keep_eval(self.model, self.schedule.eval_modules)
        return self

    @property
    def stages(self) -> int:
        """Phases of the freeze plan begun so far (1 = the start)."""
        return self.schedule.stages

    def configure_callbacks(self) -> list[pl.Callback]:
        return [self.schedule, self.loss_guard, self.rank_check]

    def on_train_epoch_start(self) -> None:
        # Every random stream restarts from (seed, epoch): a resumed run draws what the
        # uninterrupted run drew (dropout here; data order and augmentation in the data).
        seed_epoch(self.seed, self.current_epoch)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target,
                                                      pos_weight=self.class_weight)
        return F.cross_entropy(logits, target, weight=self.class_weight,
                               label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        target = y
        if self.mix is not None:  # MixUp / CutMix: mixed images, soft targets
            x, target = self.mix(x, y)
        logits, aux = split_outputs(self._run(x))
        loss = self._loss(logits, target)
        for aux_logits in aux:
            loss = loss + self.aux_weight * self._loss(aux_logits, target)
        # Not on the progress bar: refreshing it every step would read the loss from the GPU
        # (a host sync per step); Lightning reads it every trainer.log_every_n_steps.
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._predictions = []
        self._val_loss = torch.zeros((), device=self.device)
        self._val_count = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        if self.multilabel:  # probabilities per label, for the thresholds tuned at the end
            self._predictions.append(torch.sigmoid(logits))
            loss = F.binary_cross_entropy_with_logits(logits, y)
            self.val_metrics.update(logits, y.long())
        else:
            self._predictions.append(logits.argmax(dim=1))  # on device: no sync per step
            loss = F.cross_entropy(logits, y)
            self.val_metrics.update(logits, y)
            self.confusion.update(logits, y)
        self._val_loss = self._val_loss + loss.detach() * len(y)
        self._val_count += len(y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        if self.confusion is not None:
            self.last_confusion = self.confusion.compute().cpu()
            self.confusion.reset()
        if self._predictions:
            predictions = torch.cat(self._predictions)
            if self.trainer.world_size > 1:
                # DistributedSampler (no shuffle) gave rank r the items r, r + W, ...
                gathered = self.all_gather(predictions)
                predictions = gathered.transpose(0, 1).reshape(-1, *predictions.shape[1:])
            self.last_predictions = predictions.cpu().tolist()
        if self._trainer is not None and self._val_count and not self.trainer.sanity_checking \
                and self.trainer.lr_scheduler_configs:
            loss = self.trainer.strategy.reduce(self._val_loss / self._val_count, reduce_op="mean")
            self.trainer.lr_scheduler_configs[0].scheduler.observe(  # type: ignore[union-attr]
                float(loss))

    def configure_optimizers(self) -> Any:
        apply_stage(self.model, self.freeze_plan, self.stages)
        optimizer = make_optimizer(self.optim_cfg, torch_groups(
            [g for g in self.groups if g.stage < self.stages], self.model))
        scheduler = build_scheduler(optimizer, self.sched_cfg, self.trainer.max_epochs or 1,
                                    int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
