"""The freeze/unfreeze schedule as a Lightning callback that owns its state.

At the start of each epoch the phases due by then begin: their modules unfreeze and their
named parameter groups join the running optimizer and the schedule. The number of phases
begun is saved in checkpoints (`checkpoint["finetune"]`) and restored before the optimizer is
rebuilt, so a resumed run continues bit-exactly, across an unfreeze too. Under DDP the
parameters that join after DDP wrapped the model have their gradients averaged here.
(freezing.py holds the pure functions on nn.Module; this is the part that needs a Trainer.)
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from torch import nn

from finetune.training.freezing import FreezePlan, apply_stage
from finetune.training.optim import GroupPlan, Schedule, torch_groups

log = logging.getLogger("finetune")


class FreezeSchedule(pl.Callback):
    """The phases of `plan` on `model`, begun on schedule; `stages` counts those begun."""

    def __init__(self, model: nn.Module, plan: FreezePlan, groups: list[GroupPlan]) -> None:
        self.model, self.plan, self.groups = model, plan, groups
        self.stages = plan.stages_until(0)  # 1 = the start
        apply_stage(model, plan, self.stages)
        self.late: list[nn.Parameter] = []  # joined after DDP wrapped the model

    @property
    def eval_modules(self) -> list[str]:
        """The frozen BatchNorm layers that stay in eval mode now."""
        return self.plan.stages[self.stages - 1].eval_modules

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.plan.stages_until(trainer.current_epoch)
        while self.stages < due:
            self._begin_stage(trainer, self.stages)
        for group in trainer.optimizers[0].param_groups:
            pl_module.log(f"lr-{group['name']}", group["lr"], on_step=False, on_epoch=True,
                          sync_dist=True)

    def _begin_stage(self, trainer: pl.Trainer, index: int) -> None:
        """Unfreeze a phase's modules and add their named groups to the running optimizer."""
        optimizer = trainer.optimizers[0]
        groups = torch_groups([g for g in self.groups if g.stage == index], self.model)
        stage = apply_stage(self.model, self.plan, index + 1)
        self.stages = index + 1
        if trainer.world_size > 1:
            # DDP reduces the gradients of what trained when it wrapped the model; the
            # parameters that join later are averaged across ranks in on_after_backward.
            named = dict(self.model.named_parameters())
            self.late += [named[n] for n in stage.params]
        schedule: Schedule = trainer.lr_scheduler_configs[0].scheduler  # type: ignore
        schedule.add_groups(groups)  # scheduled from their first step
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        joined = ", ".join(f"{g['name']} lr {g['lr']:.3g}" for g in optimizer.param_groups[
            -len(groups):])
        log.info("unfreeze at epoch %d: %s -> %d more parameter tensors train (%s); now %s of "
                 "%s parameters trainable (%.1f%%)", stage.epoch, stage.selector,
                 len(stage.params), joined, f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["finetune"] = {"stages": self.stages,
                                  "groups": [g["name"] for g in
                                             trainer.optimizers[0].param_groups]}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Before configure_optimizers: the optimizer is rebuilt with the groups it saved.
        saved = checkpoint.get("finetune", {})
        self.stages = int(saved.get("stages", self.stages))
        apply_stage(self.model, self.plan, self.stages)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.late:
            return

        for param in self.late:
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad.div_(trainer.world_size)
