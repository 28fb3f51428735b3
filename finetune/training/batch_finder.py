"""`data.batch_size: auto`: the largest batch that fits the device, found by Lightning's
batch-size finder before the run trains.

The finder trains a few steps at a batch of 2, then 4, 8, ... until the device runs out of
memory (or the batch reaches the training set, or MAX_BATCH), and keeps the last size that
ran. It runs on its own module and Trainer over the run's model and data; Lightning saves the
model before it and restores it after, so the run then starts from exactly the weights it
would have had. The plan is made with a placeholder size; once found, the size becomes
`data.batch_size` in the config the run records. The learning rate is not scaled with it
(`optim.lr=auto` runs after it, at the found size).

On a CPU nothing signals out-of-memory before the machine swaps, so `auto` is refused there;
so it is with several processes (each rank would find its own), `resume` (the run must keep
its batches) and unfreeze phases (a later phase trains more layers and needs more memory than
the first, which is what the finder would measure).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from finetune.compose.ranges import BATCH_AUTO, MAX_BATCH, is_auto_batch
from finetune.data.datamodule import on_accelerator
from finetune.errors import FinetuneError
from finetune.training.lr_finder import several_processes

log = logging.getLogger("finetune")

START = 2  # the first batch tried (Lightning's default)
STEPS_PER_TRIAL = 3  # training steps at each size (Lightning's default)


def batch_problems(cfg: DictConfig, task_kind: str) -> list[str]:
    """Where `data.batch_size=auto` cannot run, one sentence each (a value that is neither a
    number nor auto is the schema's sentence, said when the config is composed)."""
    if not is_auto_batch(cfg.data.batch_size):
        return []
    problems = []
    if not on_accelerator(cfg.trainer.accelerator):
        problems.append(f"data.batch_size={BATCH_AUTO} on CPU: the batch-size finder doubles "
                        "the batch until the device runs out of memory, and a CPU swaps "
                        "instead of saying so; give a number (64 is a good start)")
    if several_processes(cfg):
        problems.append(f"data.batch_size={BATCH_AUTO} with several processes (DDP): each rank "
                        "would find its own; find it in a one-device run (trainer.devices=1) "
                        "and give it as data.batch_size")
    if cfg.resume:
        problems.append(f"data.batch_size={BATCH_AUTO} with resume: a resumed run keeps the "
                        "first run's batches; give its data.batch_size (its manifest.json)")
    if cfg.freeze.get("unfreeze"):
        problems.append(f"data.batch_size={BATCH_AUTO} with freeze.unfreeze: a later phase "
                        "trains more layers and needs more memory than the first, which is "
                        "what the finder would measure; give a number")
    if task_kind != "classifier":
        problems.append(f"data.batch_size={BATCH_AUTO} with task={cfg.task}: the batch-size "
                        "finder is built for classifiers so far; give data.batch_size")
    return problems


def find_batch_size(cfg: DictConfig, data: pl.LightningDataModule, root: Any,
                    make_module: Callable[[], pl.LightningModule],
                    limit: int = MAX_BATCH) -> dict[str, Any]:
    """Run the finder on a module from `make_module` (over the run's model), set
    `data.batch_size` (in `cfg` and on `data`) to what it found; returns what metrics.json
    records. `limit`: the largest batch tried."""
    # lazy: the tuner is needed only here
    from pytorch_lightning.tuner import Tuner

    module = make_module()
    start_epoch = data.start_epoch  # restoring the finder's checkpoint would move it
    trainer = pl.Trainer(  # no files, no logger; one epoch of STEPS_PER_TRIAL steps per size
        default_root_dir=root, accelerator=cfg.trainer.accelerator, devices=1,
        precision=cfg.trainer.precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches)
    data.batch_size = START
    with contextlib.redirect_stderr(io.StringIO()):
        found = Tuner(trainer).scale_batch_size(
            module, datamodule=data, mode="power", steps_per_trial=STEPS_PER_TRIAL,
            init_val=START, max_val=limit)
    data.start_epoch = start_epoch
    if not found:
        raise FinetuneError(f"data.batch_size={BATCH_AUTO}: not even a batch of {START} "
                            "images fits the device's memory; lower data.image_size, freeze "
                            "more layers, or use a smaller model")
    # a batch past the training set holds the set: that is the batch the run trains with
    size = min(int(found), len(data.train_set))
    capped = "the training set's size" if size == len(data.train_set) else (
        "the limit" if size >= limit else "the largest that fit")
    data.batch_size = size
    cfg.data.batch_size = size
    log.info("data.batch_size=auto: %d images per step (%s; sizes from %d, doubled, %d steps "
             "each)", size, capped, START, STEPS_PER_TRIAL)
    return {"found": size, "stopped_at": capped, "start": START,
            "steps_per_trial": STEPS_PER_TRIAL, "limit": limit}
