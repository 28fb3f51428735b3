"""The LightningModule: a built model, its freeze plan and optimizer config; steps and metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection

from finetune.registry import make_optimizer
from finetune.seeding import seed_epoch
from finetune.tasks.base import Task
from finetune.tasks.table import DEFAULT as DEFAULT_TASK
from finetune.tasks.table import TASKS
from finetune.training.freeze_schedule import FreezeSchedule
from finetune.training.freezing import FreezePlan, apply_stage, keep_eval
from finetune.training.guards import LossGuard, RankCheck
from finetune.training.optim import GroupPlan, build_scheduler, plan_groups, torch_groups

log = logging.getLogger("finetune")


def split_outputs(output: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, auxiliary logits): inception_v3 / googlenet return a tuple in training,
    torchvision's segmentation models {"out": ..., "aux": ...}."""
    if isinstance(output, dict):
        return output["out"], [output["aux"]] if output.get("aux") is not None else []
    if isinstance(output, tuple):
        return output[0], [aux for aux in output[1:] if aux is not None]
    return output, []


@dataclass(frozen=True)
class StepOptions:
    """How the steps run: the loss's label smoothing and auxiliary-head weight, the seed of
    each epoch's random streams, and the forward's memory format and compilation."""

    label_smoothing: float = 0.0
    aux_weight: float = 0.4
    seed: int = 0
    channels_last: bool = False
    compile: bool = False


class FinetuneModule(pl.LightningModule):
    """Thin: receives the built model and the plan; parses no config. The task (a
    finetune.tasks entry) owns the loss, the metrics and what validation keeps."""

    def __init__(self, model: nn.Module, num_classes: int, freeze: FreezePlan, optim: Any,
                 sched: Any, *, task: Task | None = None, options: StepOptions | None = None,
                 groups: list[GroupPlan] | None = None,
                 class_weights: list[float] | None = None, mix: Any = None) -> None:
        super().__init__()
        options = options or StepOptions()
        label_smoothing, aux_weight, seed = (options.label_smoothing, options.aux_weight,
                                             options.seed)
        channels_last, compile = options.channels_last, options.compile
        self.task = task or TASKS[DEFAULT_TASK]
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
        # Watching the loss for NaN/inf and, under DDP, the ranks' tensors (training/guards.py)
        self.loss_guard, self.rank_check = LossGuard(), RankCheck()
        self.label_smoothing, self.aux_weight = label_smoothing, aux_weight
        # the task's loss weights (loss.class_weights, or a label's pos_weight) weigh the
        # training loss only
        self.val_metrics = MetricCollection(self.task.metric_set(num_classes), prefix="val/")
        self.confusion = self.task.confusion(num_classes)
        self.last_confusion: torch.Tensor | None = None
        # what the task keeps per validation image (a class index, or probabilities per
        # label), in loader order
        self.last_predictions: list[Any] = []
        self._val_loss, self._val_count = torch.zeros(()), 0
        self._predictions: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_outputs(self._run(x))[0]

    def _run(self, x: torch.Tensor) -> Any:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    @property
    def step_network(self) -> nn.Module:
        """The network a training step runs (uncompiled): the model, or the suffix the
        feature cache leaves; what the step's FLOPs are counted on."""
        suffix = self.__dict__.get("_suffix")
        return suffix if suffix is not None else self.model

    def use_features(self, suffix: nn.Module) -> None:
        """Batches now hold the frozen prefix's outputs (the feature cache): steps run the
        suffix, which shares its modules (and so its parameters) with the model."""
        object.__setattr__(self, "_suffix", suffix)
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
        return self.task.loss(logits, target, self.class_weight, self.label_smoothing)

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
        self._predictions.append(self.task.kept(logits))
        loss = self.task.loss(logits, y)  # unweighted: comparable across runs
        self.val_metrics.update(logits, self.task.metric_target(y))
        if self.confusion is not None:
            self.confusion.update(logits, y)
        self._val_loss = self._val_loss + loss.detach() * len(y)
        self._val_count += len(y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def summary(self, names: list[str]) -> dict[str, Any]:
        """What this kind of model adds to metrics.json after fit (here nothing)."""
        return {}

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
