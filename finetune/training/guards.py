"""Callbacks that watch a run for what must not pass silently: a loss that is no longer
finite (training stops before a checkpoint saves it), and, under DDP, ranks that end with
different tensors. FinetuneModule adds both (configure_callbacks), so a module alone is
enough to fit with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from finetune.errors import FinetuneError


class NonFiniteLoss(FinetuneError):
    """The loss became NaN or infinite: training stops before a checkpoint saves it."""


class LossGuard(pl.Callback):
    """Keeps the first step whose training loss was not finite, and that loss, on the device
    (no host sync per step); reads them when Lightning logs anyway (every
    trainer.log_every_n_steps) and at each epoch's last batch, before its checkpoint."""

    def __init__(self) -> None:
        self._bad_step: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None
        self._step = 0
        self._first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = trainer.global_step  # 0, or where a resumed run goes on

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._watch(loss.detach(), self._step)
        every = trainer.log_every_n_steps or 1
        last = batch_idx + 1 >= trainer.num_training_batches
        if self._bad_step is None or not (last or (batch_idx + 1) % every == 0):
            return
        step = int(self._bad_step)
        if step >= 0:
            raise NonFiniteLoss(self._message(trainer, step, float(self._bad_loss),
                                              first=step == self._first_step))

    def _watch(self, loss: torch.Tensor, step: int) -> None:
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    @staticmethod
    def _message(trainer: pl.Trainer, step: int, loss: float, first: bool = False) -> str:
        epoch = trainer.current_epoch
        if first:  # no update has happened yet: the learning rate cannot be the cause
            return (f"the training loss was {loss} at the first step ({step}), before any "
                    "update, so not because of the learning rate: the model's weights or the "
                    "input images hold non-finite values (or the model computes them: check "
                    "the surgery); nothing was saved")
        good = [Path(p) for cb in trainer.checkpoint_callbacks
                for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""))
                if p and Path(p).is_file()]
        kept = (f"the last good checkpoint is {good[0]} (epoch {epoch - 1}), resumable with "
                f"resume={good[0]}" if good and epoch > 0 else
                "no checkpoint was written before it")
        return (f"the training loss became {loss} at step {step} (epoch {epoch}); training "
                f"stopped before saving anything of it: {kept}; lower optim.lr, set "
                "trainer.gradient_clip_val, or check the data")


class RankCheck(pl.Callback):
    """Under DDP, at the end of fit: whether every rank holds the same tensors, frozen and
    trained (`result`, recorded in metrics.json); None on one device."""

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size <= 1:
            return
        model = pl_module.model
        state = model.state_dict()
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}

        def sums(names: list[str]) -> torch.Tensor:
            return torch.stack([torch.stack([state[n].double().sum(), state[n].double().abs()
                                             .sum()]) for n in names]).to(pl_module.device)

        kinds = {"frozen": [n for n in state if n in frozen],
                 "trained": [n for n, p in model.named_parameters() if p.requires_grad]}
        self.result = {"world_size": trainer.world_size}
        for kind, names in kinds.items():
            gathered = pl_module.all_gather(sums(names)) if names else None
            self.result[f"{kind}_tensors_identical_across_ranks"] = bool(
                gathered is None or all(torch.equal(gathered[0], g) for g in gathered))
