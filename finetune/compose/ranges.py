"""The range of every numeric value of the schema, checked with every other problem before
anything trains (finetune/compose/precheck.py), and written beside each key in conf/config.yaml (a
test holds the two together). A value outside its range is refused in one line naming the
key, the value and the range: a run that cannot learn (no epochs, a zero-width layer, a
learning rate <= 0 anywhere) is never started.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside
    high_open: bool = False

    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high
                                         or (self.high_open and value == self.high))


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, low_open=True), Range(0), Range(1)
# Upper bounds where memory is at stake: past them a value exhausts memory rather than train
# (a received recipe must not be able to do that); the plan's estimate checks the rest
# against this machine (memory_problem).
MAX_IMAGE_SIZE = 8192  # px per side
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_WIDTH = 65_536  # a hidden layer of the head
MAX_BATCH = 65_536
BATCH_AUTO = "auto"  # data.batch_size: found by the batch-size finder (training/batch_finder.py)
BATCH_PLACEHOLDER = 2  # the size an `auto` run is planned at until it is found (the first tried)


def is_auto_batch(value: Any) -> bool:
    """Whether a `data.batch_size` value asks for the batch-size finder."""
    return isinstance(value, str) and value.strip().lower() == BATCH_AUTO


def planned_batch_size(value: Any) -> int:
    """`data.batch_size` as a number: the placeholder while `auto` is not found yet (and for a
    value that is not a number, which the plan reports as a problem of its own)."""
    return value if isinstance(value, int) and not isinstance(value, bool) \
        else BATCH_PLACEHOLDER
FRACTION_OPEN = Range(0, 1, high_open=True)  # [0, 1)

# key -> range (null, where the key allows it, is always fine)
RANGES: dict[str, Range] = {
    "weights.min_loaded": Range(0, 1),
    "model.ema.decay": Range(0, 1, low_open=True, high_open=True),
    "model.ema.start_epoch": AT_LEAST_0,
    "head.num_classes": Range(1, MAX_CLASSES),
    "head.dropout": FRACTION_OPEN,
    "adapter.rank": Range(1, 4096),
    "adapter.alpha": POSITIVE,
    "adapter.dropout": FRACTION_OPEN,
    "adapter.lr": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_0,
    "optim.momentum": FRACTION_OPEN,
    "optim.eps": POSITIVE,
    "optim.alpha": Range(0, 1),
    "optim.layer_decay": Range(0, 1, low_open=True),
    "sched.epochs": AT_LEAST_1,
    "sched.warmup_epochs": AT_LEAST_0,
    "sched.step_size": AT_LEAST_1,
    "sched.gamma": Range(0, 1, low_open=True),
    "sched.patience": AT_LEAST_0,
    "loss.label_smoothing": FRACTION_OPEN,
    "loss.aux_weight": AT_LEAST_0,
    "data.image_size": Range(8, MAX_IMAGE_SIZE),
    "data.batch_size": Range(1, MAX_BATCH),
    "data.val_fraction": Range(0, 1, low_open=True, high_open=True),
    "data.crop_pct": Range(0, 1, low_open=True),
    "data.test_fraction": Range(0, 1, low_open=True, high_open=True),
    "data.folds": Range(2),
    "data.fold": AT_LEAST_0,
    "data.train_size": AT_LEAST_1,
    "data.fake_size": Range(2, 1_000_000),
    "data.max_image_pixels": Range(1, 1 << 30),  # a guard: never off
    "data.mix.mixup_alpha": AT_LEAST_0,
    "data.mix.cutmix_alpha": AT_LEAST_0,
    "data.mix.prob": Range(0, 1),
    "data.fake_classes": Range(2, MAX_CLASSES),
    "data.canvases.count": Range(2, 100_000),
    "data.ignore_index": Range(0, 65_535),
    "data.canvases.size": Range(16, MAX_IMAGE_SIZE),
    "data.canvases.per_canvas": Range(1, 64),
    "trainer.max_epochs": AT_LEAST_1,
    "trainer.num_nodes": AT_LEAST_1,
    "trainer.log_every_n_steps": AT_LEAST_1,
    "trainer.check_val_every_n_epoch": AT_LEAST_1,
    "trainer.gradient_clip_val": POSITIVE,
    "trainer.peak_tflops": POSITIVE,
    "trainer.accumulate_grad_batches": AT_LEAST_1,
    "trainer.num_sanity_val_steps": AT_LEAST_0,
    "trainer.early_stopping.patience": AT_LEAST_1,
    "trainer.early_stopping.min_delta": AT_LEAST_0,
    "sweep.heartbeat": AT_LEAST_1,
    "sweep.pruner.warmup_epochs": AT_LEAST_0,
    "sweep.pruner.startup_trials": AT_LEAST_0,
    "sweep.pruner.min_epochs": AT_LEAST_1,
    "sweep.pruner.reduction_factor": Range(2),
    "sweep.trial": AT_LEAST_0,
    "seed": Range(0, 2**32 - 1),  # numpy's seeds
}
# each item of a list
ITEM_RANGES: dict[str, Range] = {
    "head.hidden": Range(1, MAX_WIDTH),
    "optim.betas": FRACTION_OPEN,
    "data.mean": Range(0, 1),
    "data.std": POSITIVE,
    "loss.class_weights": POSITIVE,
    "loss.pos_weight": POSITIVE,
    "data.canvases.scales": Range(1, 64),
}
# each field of each entry of a list of mappings
ENTRY_RANGES: dict[str, dict[str, Range]] = {
    "adapter.overrides": {"rank": Range(1, 4096), "alpha": POSITIVE},
    "optim.groups": {"lr": POSITIVE, "lr_mult": POSITIVE, "weight_decay": AT_LEAST_0},
    "freeze.unfreeze": {"epoch": AT_LEAST_0, "lr": POSITIVE, "lr_mult": POSITIVE,
                        "warmup_epochs": AT_LEAST_0},
}
# key -> (the form a text value must have, what to write instead)
TEXTS: dict[str, tuple[re.Pattern[str], str]] = {
    # a branch, tag or commit: it becomes part of a path in the Hugging Face cache (refs/...)
    "weights.revision": (re.compile(r"(?!.*\.\.)(?!/)[A-Za-z0-9_.\-/]{1,128}(?<!/)"),
                         "a branch, tag or commit name (letters, digits, _ . - /; no '..' and "
                         "no leading or trailing /)"),
}
# a fraction of the batches (a float) or a number of them (an int)
LIMITS = ("trainer.limit_train_batches", "trainer.limit_val_batches")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check(key: str, value: Any, allowed: Range) -> str | None:
    number = _number(value)
    if value is None or number is None or allowed.holds(number):
        return None  # null where allowed; a wrong type is the schema's sentence
    return f"{key}={value}: must be {allowed.text()} (conf/config.yaml gives each key's range)"


def range_problems(cfg: Any) -> list[str]:
    """Every value outside its range, one line each."""

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, throw_on_missing=False)

    problems = [p for key, allowed in RANGES.items() if (p := _check(key, get(key), allowed))]
    for key, allowed in ITEM_RANGES.items():
        items = get(key)
        for i, item in enumerate(items if OmegaConf.is_list(items) or isinstance(items, list)
                                 else []):  # (loss.class_weights may also be `auto`)
            problems += [p for p in [_check(f"{key}[{i}]", item, allowed)] if p]
    for key, fields in ENTRY_RANGES.items():
        for i, entry in enumerate(get(key) or []):
            for name, allowed in fields.items():
                problem = _check(f"{key}[{i}].{name}", OmegaConf.select(entry, name), allowed)
                problems += [problem] if problem else []
    for key, (form, what) in TEXTS.items():
        value = get(key)
        if value is not None and not form.fullmatch(str(value)):
            problems.append(f"{key}={value!r}: must be {what}")
    for key in LIMITS:
        value = get(key)
        lowest = 0 if key == "trainer.limit_val_batches" else 1  # 0: no validation, allowed
        if isinstance(value, float) and not (lowest == 0 <= value <= 1 or 0 < value <= 1):
            problems.append(f"{key}={value}: a fraction of the batches must be in "
                            f"{'[0' if lowest == 0 else '(0'}, 1]; or give a number of batches "
                            f"(an int >= {lowest})")
        elif isinstance(value, int) and not isinstance(value, bool) and value < lowest:
            problems.append(f"{key}={value}: a number of batches must be >= {lowest}; or give "
                            "a fraction in (0, 1]")
    return problems
