"""The optimizer over trainable parameters and its learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from finetune.errors import FinetuneError
from finetune.registry import make_optimizer

# Warm-up starts from this fraction of the configured learning rate.
WARMUP_START = 0.01


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """`cfg` is the optim group; frozen parameters are not handed to the optimizer at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    return make_optimizer(cfg.name, params, cfg.lr, cfg.weight_decay, cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, max_epochs: int,
                    total_steps: int) -> dict[str, Any] | None:
    """A Lightning lr_scheduler config for `cfg` (the sched group), or None for `none`."""
    warmup = cfg.warmup_epochs
    if cfg.name == "none":
        if not warmup:
            return None
        main: Any = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif cfg.name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs - warmup))
    elif cfg.name == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name == "plateau":
        if warmup:
            raise FinetuneError("sched.warmup_epochs is not supported with sched.name=plateau; "
                                "set it to 0 or choose cosine / step")
        plateau = lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.gamma,
                                                 patience=cfg.patience)
        return {"scheduler": plateau, "interval": "epoch", "monitor": "val/loss"}
    else:  # onecycle: per step, its own warm-up
        lrs = [group["lr"] for group in optimizer.param_groups]
        pct = min(0.9, warmup / max_epochs) if warmup else 0.3
        onecycle = lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=max(2, total_steps),
                                           pct_start=pct)
        return {"scheduler": onecycle, "interval": "step"}
    if warmup:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup)
        main = lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
    return {"scheduler": main, "interval": "epoch"}
