"""The learning-rate schedules, one small object each, found in one table (`SCHEDULES`).

A schedule is the factor every group's base rate is multiplied by at (fractional) epoch t,
after the warm-up (finetune/training/optim.py, `Schedule`, does warm-up, per-group ramps,
groups that join mid-run and resume for all of them). Adding one is one class and one entry in
SCHEDULES (docs/extending.md). The module imports no torch: `sched.name` choices are checked
from this table at compose time.
"""

from __future__ import annotations

import math
from typing import Any

from finetune.extensions import Table

ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4  # as torch.optim.lr_scheduler.OneCycleLR


def cos_between(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


class LRShape:
    """`factor(s, t)`: the multiplier t epochs after the warm-up (after the start, for a
    shape that owns its warm-up); `s` is the running Schedule (its epochs, warmup,
    steps_per_epoch, step_size, gamma and plateau state)."""

    name = ""
    per_step = False  # t advances every optimizer step (else every epoch)
    owns_warmup = False  # the shape ramps up itself: no separate linear warm-up
    observes_loss = False  # Schedule.observe(val_loss) moves it

    def factor(self, s: Any, t: float) -> float:
        return 1.0


class Constant(LRShape):
    name = "none"


class Cosine(LRShape):
    """Half a cosine from 1 to 0 over the epochs after warm-up."""

    name = "cosine"

    def factor(self, s: Any, t: float) -> float:
        span = max(1, s.epochs - s.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))


class Step(LRShape):
    """x gamma every step_size epochs."""

    name = "step"

    def factor(self, s: Any, t: float) -> float:
        return s.gamma ** (int(t) // s.step_size)


class Plateau(LRShape):
    """x gamma after `patience` epochs without a lower val/loss (Schedule.observe)."""

    name = "plateau"
    observes_loss = True

    def factor(self, s: Any, t: float) -> float:
        return s.plateau_factor


class OneCycle(LRShape):
    """torch's OneCycleLR shape (cosine up, then down to lr / 25e4), stepped per batch; the
    warm-up share is warmup_epochs / epochs (default 0.3)."""

    name = "onecycle"
    per_step = True
    owns_warmup = True

    def factor(self, s: Any, t: float) -> float:
        total = s.epochs * s.steps_per_epoch
        pct = min(0.9, s.warmup / s.epochs) if s.warmup else 0.3
        up = max(1.0, pct * total - 1)
        step = t * s.steps_per_epoch
        low, final = 1.0 / ONECYCLE_DIV, 1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        if step <= up:
            return cos_between(low, 1.0, step / up)
        return cos_between(1.0, final, min(1.0, (step - up) / max(1.0, total - 1 - up)))


SCHEDULES = Table("sched.name", "finetune.schedules", "learning-rate schedule")
SCHEDULES.add(Constant(), Cosine(), Step(), OneCycle(),
                                                      Plateau())
