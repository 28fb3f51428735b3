"""`optim.lr: auto`: the learning rate found by Lightning's learning-rate finder (an LR range
test: a short run whose learning rate grows exponentially each step, the suggestion taken
where the smoothed loss falls fastest) before the run trains.

The test runs on its own module and Trainer over the run's model and data, with the run's
optimizer groups; Lightning saves the model before it and restores it after, so the run then
starts from exactly the weights it would have had (and, each epoch reseeding every random
stream, trains as a run given that learning rate does). The plan is made with a placeholder
rate; once found, the rate becomes `optim.lr` in the config the run records, and every group
is planned again from it (groups with their own `lr` keep theirs).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from finetune.errors import FinetuneError
from finetune.rundir import artifacts, plots
from finetune.training.optim import is_auto

log = logging.getLogger("finetune")

MIN_LR, MAX_LR = 1.0e-6, 1.0
STEPS = 100  # Lightning's default number of rates tried


def lr_problems(cfg: DictConfig, task_kind: str) -> list[str]:
    """A bad `optim.lr`, or `auto` where the finder cannot run, one sentence each."""
    lr = cfg.optim.lr
    number = isinstance(lr, int | float) and not isinstance(lr, bool)
    if not number and not is_auto(lr):
        shown = lr if isinstance(lr, str | bool) or lr is None else type(lr).__name__
        return [f"optim.lr={shown!r}: give a learning rate > 0, e.g. 1.0e-3, or auto (found "
                "by Lightning's learning-rate finder before the run trains)"]
    if not is_auto(lr):
        return []
    problems = []
    if several_processes(cfg):
        problems.append("optim.lr=auto with several processes (DDP): the learning-rate finder "
                        "runs in one; find the rate in a one-device run (trainer.devices=1) "
                        "and give it as optim.lr")
    if cfg.resume:
        problems.append("optim.lr=auto with resume: a resumed run continues with the rate the "
                        "first run found; give it as optim.lr (that run's metrics.json, `lr`)")
    if task_kind != "classifier":
        problems.append(f"optim.lr=auto with task={cfg.task}: the learning-rate finder is built "
                        "for classifiers so far; give optim.lr")
    return problems


def several_processes(cfg: DictConfig) -> bool:
    """Whether the run trains in several processes (DDP: a strategy, nodes or devices)."""
    trainer = cfg.trainer
    devices = trainer.devices
    return (str(trainer.strategy).startswith("ddp") or int(trainer.num_nodes) > 1
            or (isinstance(devices, int) and devices > 1)
            or (not isinstance(devices, int | str) and len(devices) > 1)
            or (str(devices) == "auto" and str(trainer.accelerator) in ("auto", "gpu", "cuda")
                and torch.cuda.device_count() > 1))


def find_lr(cfg: DictConfig, data: pl.LightningDataModule, run_dir: Path,
            make_module: Callable[[], pl.LightningModule]) -> dict[str, Any]:
    """Run the range test on a module from `make_module` (over the run's model), set
    `optim.lr` to the suggestion, plot the curve into the run dir; returns what
    metrics.json records."""
    # lazy: the tuner is needed only here
    from pytorch_lightning.tuner import Tuner

    module = make_module()
    start_epoch = data.start_epoch  # restoring the finder's checkpoint would move it
    epochs = math.ceil(STEPS / _batches_per_epoch(cfg, data))
    trainer = pl.Trainer(  # no validation (the finder reads the training loss), no files
        default_root_dir=run_dir, accelerator=cfg.trainer.accelerator, devices=1,
        precision=cfg.trainer.precision, max_epochs=epochs, check_val_every_n_epoch=epochs + 1,
        limit_train_batches=cfg.trainer.limit_train_batches, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches)
    # the finder draws its own progress bar on stderr, whatever the run's setting: one log
    # line says what it found instead
    with contextlib.redirect_stderr(io.StringIO()):
        finder = Tuner(trainer).lr_find(module, datamodule=data, min_lr=MIN_LR, max_lr=MAX_LR,
                                        num_training=STEPS, update_attr=False)
    data.start_epoch = start_epoch
    lrs, losses = (finder.results["lr"], finder.results["loss"]) if finder else ([], [])
    suggested = suggest(lrs, losses)
    if suggested is None:
        raise FinetuneError("optim.lr=auto: the learning-rate finder's loss never fell over "
                            f"{len(lrs)} steps from {MIN_LR:g} to {MAX_LR:g}, so no rate can "
                            "be picked from it; give optim.lr")
    cfg.optim.lr = suggested
    plots.plot_lr_find(lrs, losses, suggested, run_dir / artifacts.LR_FIND)
    log.info("optim.lr=auto: the learning-rate finder's loss was lowest at %.3g; the run trains "
             "at a tenth of it, %.3g (%d rates from %g to %g; %s)", suggested * 10, suggested,
             len(lrs), MIN_LR, MAX_LR, artifacts.LR_FIND)
    return {"suggested": suggested, "lowest_loss_at": suggested * 10, "steps": len(lrs),
            "min_lr": MIN_LR, "max_lr": MAX_LR, "plot": artifacts.LR_FIND,
            "rule": "a tenth of the rate with the lowest smoothed loss"}


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """A tenth of the rate at which the smoothed loss is lowest — the classic reading of an LR
    range test (Smith; fastai's `lr_min`), steady where the steepest-slope rule Lightning
    suggests follows the noise of the first, tightly spaced rates. None where the loss
    never fell below its first value (nothing to read)."""
    points = [(lr, loss) for lr, loss in zip(lrs, losses, strict=False) if math.isfinite(loss)]
    if len(points) < 2:
        return None
    best_lr, best_loss = min(points, key=lambda p: p[1])
    if best_loss >= points[0][1]:
        return None
    return float(best_lr) / 10

def _batches_per_epoch(cfg: DictConfig, data: pl.LightningDataModule) -> int:
    full = max(1, math.ceil(len(data.train_set) / cfg.data.batch_size))
    limit = cfg.trainer.limit_train_batches
    if isinstance(limit, float):
        return max(1, int(full * limit))
    return max(1, min(full, int(limit)))
