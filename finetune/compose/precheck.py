"""The checks a run makes that need neither torch nor the model: run by the CLI before it
imports torch (a wrong path or value is one line in about a second, and leaves nothing
behind), and again inside the plan with everything else (finetune.validate)."""

from __future__ import annotations

import importlib.util
import itertools
import os
from typing import Any

from omegaconf import OmegaConf

from finetune.compose.ranges import planned_batch_size, range_problems
from finetune.compose.schema import mix_enabled
from finetune.data.formats import FORMATS
from finetune.tasks.table import TASKS, task_of
from finetune.training.loggers import LOGGERS
from finetune.weights.sources import source_of

BATCH_MIXES = ("MixUp", "CutMix")  # torchvision v2 batch transforms, not per-image ones


def num_classes_problem(configured: int | None, class_names: list[str]) -> str | None:
    """head.num_classes against the data's classes (null follows the data)."""
    if configured is None or configured == len(class_names):
        return None
    return (f"head.num_classes={configured} but the data has {len(class_names)} classes "
            f"({', '.join(class_names[:12])}); set head.num_classes={len(class_names)}, or "
            "null to follow the data")


def single_class_problem(class_names: list[str], where: str) -> str | None:
    """A classifier needs two classes at least."""
    if len(class_names) >= 2:
        return None
    return (f"data: only one class ({', '.join(class_names) or 'none'}) in {where}; a "
            "classifier needs at least two: add a folder of other images (for a yes/no model, "
            "one of negatives) or list more in data.classes")


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_floor(cfg: Any, classes: int) -> int:
    """Bytes a run needs at the least, before the backbone's own: one float32 batch of
    inputs, the head's weights with their gradients and two optimizer moments (its input
    width taken as 512, below most backbones'), and fake data held in memory."""
    size = cfg.data.image_size or 224
    inputs = planned_batch_size(cfg.data.batch_size) * cfg.data.channels * size * size * 4
    widths = [512, *cfg.head.hidden, classes] if cfg.head.type != "none" else [0]
    head = sum(a * b for a, b in itertools.pairwise(widths)) * 4 * 4
    fake = cfg.data.fake_size * 3 * size * size if cfg.data.name == "fake" else 0
    return inputs + head + fake


def memory_problem(cfg: Any, classes: int, available: int | None) -> str | None:
    """Why the run cannot fit this machine's memory, by the floor alone (None: it may)."""
    needed = memory_floor(cfg, classes)
    if available is None or needed <= available:
        return None
    return (f"data.batch_size={cfg.data.batch_size}, data.image_size="
            f"{cfg.data.image_size or 224}, head.hidden={list(cfg.head.hidden)} and {classes} "
            f"classes need at least {needed / 2**30:,.1f} GiB of memory for one batch of inputs "
            f"and the head alone, and this machine has {available / 2**30:,.1f} GiB; lower "
            "data.batch_size, data.image_size or the head's widths")


def data_task_problem(data_format: Any, task: Any) -> str | None:
    """Data of one kind (class labels, boxes) given to a task that reads the other: one
    sentence naming what would fit (None: they match)."""
    if data_format.holds == task.reads:
        return None
    if data_format.holds != "labels":
        readers = " | ".join(t.name for t in TASKS.values() if t.reads == data_format.holds)
        page = {"boxes": "detection", "masks": "segmentation"}.get(data_format.holds, "data")
        return (f"data={data_format.name} holds {data_format.holds}, which task={task.name} "
                f"does not read; set task={readers} (docs/{page}.md), or use data of "
                f"{task.reads if task.reads != 'labels' else 'class labels'}")
    able = " | ".join(f.name for f in sorted(FORMATS.values(), key=lambda f: f.name)
                      if f.holds == task.reads)
    return (f"task={task.name} reads {task.reads}, and data={data_format.name} holds class "
            f"labels; use data={able}")


def config_problems(cfg: Any) -> list[str]:
    """Problems of the composed config alone: the weight source's (unless it needs the
    model: validate asks it then), the data's paths, the schedule, the optimizer, the
    logger's package, the augmentations."""
    problems = range_problems(cfg)
    in_range = not problems
    source = source_of(cfg)
    if not source.needs_model:
        problems += source.problems(cfg)
    data_format = FORMATS[cfg.data.name]
    data_problems = data_format.problems(cfg.data)
    problems += data_problems
    task = task_of(cfg)
    problems += task.problems(cfg)
    problems += [mismatch] if (mismatch := data_task_problem(data_format, task)) else []
    names = None if data_problems else data_format.class_names(cfg.data)
    if in_range:  # (the estimate of values out of their ranges means nothing)
        classes = cfg.head.num_classes or (len(names) if names else 2)
        memory = memory_problem(cfg, classes, machine_memory())
        problems += [memory] if memory else []
    if cfg.head.type != "none" and cfg.head.num_classes is not None and names is not None \
            and cfg.head.num_classes >= 1 and task.counts_classes_early():
        problem = (single_class_problem(names, cfg.data.get("root") or cfg.data.name)
                   or num_classes_problem(cfg.head.num_classes, names))
        problems += [problem] if problem else []
    epochs = cfg.sched.epochs or cfg.trainer.max_epochs
    for i, phase in enumerate(cfg.freeze.unfreeze):
        if phase.epoch >= epochs:
            problems.append(f"freeze.unfreeze[{i}]: epoch {phase.epoch} is never reached (the "
                            f"run has {epochs} epochs, 0..{epochs - 1}); lower it or raise "
                            "trainer.max_epochs")
    every, max_epochs = cfg.trainer.check_val_every_n_epoch, cfg.trainer.max_epochs
    if isinstance(every, int) and isinstance(max_epochs, int) and 1 <= max_epochs < every \
            and cfg.trainer.limit_val_batches != 0:
        problems.append(f"trainer.check_val_every_n_epoch={every} but the run has {max_epochs} "
                        "epoch(s): it would never validate (no metrics, nothing to rank); lower "
                        "it, or set trainer.limit_val_batches=0 to train without validation on "
                        "purpose")
    stopping = cfg.trainer.early_stopping
    if stopping.patience is not None and cfg.trainer.limit_val_batches == 0:
        problems.append("trainer.early_stopping needs validation, and trainer.limit_val_batches"
                        "=0 runs none: give validation batches, or patience=null")
    ema_start = cfg.model.ema.start_epoch
    if cfg.model.ema.decay is not None and isinstance(ema_start, int) and ema_start >= epochs:
        problems.append(f"model.ema.start_epoch={ema_start} is never reached (the run has "
                        f"{epochs} epochs, 0..{epochs - 1}): the EMA would never be updated; "
                        "lower it or raise trainer.max_epochs")
    if cfg.optim.nesterov and (cfg.optim.name != "sgd" or cfg.optim.momentum <= 0):
        problems.append("optim.nesterov=true needs optim.name=sgd with optim.momentum > 0")
    package = LOGGERS[cfg.logger.name].package
    if package and importlib.util.find_spec(package) is None:
        problems.append(f"logger={cfg.logger.name} needs the {package} package: "
                        f"pip install 'finetune[{cfg.logger.name}]'")
    for i, entry in enumerate(cfg.data.augment):
        name = entry if isinstance(entry, str) else OmegaConf.select(entry, "type")
        if name in BATCH_MIXES:
            key = "mixup_alpha: 0.2" if name == "MixUp" else "cutmix_alpha: 1.0"
            problems.append(f"data.augment[{i}]: {name} mixes pairs of images and their labels "
                            "across a batch, which a per-image augmentation cannot do; remove "
                            f"it and set data.mix: {{{key}}} (applied to each training batch)")
    if mix_enabled(cfg.data) and str(cfg.freeze.cache).lower() == "true":
        problems.append("freeze.cache=true but data.mix mixes images: the frozen layers see "
                        "other inputs every step, so their outputs cannot be computed once; "
                        "use freeze.cache=auto (off here) or drop data.mix")
    return problems
