"""Validate is the plan: overrides drawn from the schema's own types, ranges and choices (and
values just outside them), a few at a time, on a tiny run of the quickstart. For each, either
the run is refused with one line per problem before it trains, or it completes with finite
metrics: never a traceback, never a `complete` run with a NaN in it.

Deterministic (derandomized, no example database): CI sees the same draws on every run.
FINETUNE_PROPERTY_EXAMPLES raises the count for a longer search (the closing note of the
bad-input issue gives a 300-example run).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
from conftest import QUICK
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import finetune
from finetune.compose import schema
from finetune.compose.ranges import ITEM_RANGES, RANGES, Range
from finetune.errors import FinetuneError

EXAMPLES = int(os.environ.get("FINETUNE_PROPERTY_EXAMPLES", "14"))
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "data.batch_size=16", "checkpoint.keep=none"]
# In range but not tiny, or not for one machine: only their out-of-range values are drawn.
# (num_nodes > 1 waits for other machines; compile spends a minute compiling.)
ONLY_OUTSIDE = {"trainer.num_nodes", "data.fake_size", "data.fake_classes"}
# Inside draws kept small, so that every accepted draw is a tiny run.
CHEAP_HIGH = {"trainer.max_epochs": 2, "sched.epochs": 3, "sched.warmup_epochs": 2,
              "sched.step_size": 3, "sched.patience": 3, "data.image_size": 40,
              "data.batch_size": 24, "data.train_size": 60, "trainer.log_every_n_steps": 20,
              "trainer.check_val_every_n_epoch": 2, "trainer.accumulate_grad_batches": 3,
              "trainer.num_sanity_val_steps": 2, "head.num_classes": 6, "seed": 1000,
              "data.max_image_pixels": 10**9, "trainer.gradient_clip_val": 10.0,
              "optim.lr": 1.0, "optim.eps": 1.0, "optim.weight_decay": 1.0,
              "loss.aux_weight": 2.0}
ITEM_HIGH = {"head.hidden": 64, "data.std": 2.0}
BOOLEANS = ["model.channels_last", "optim.nesterov", "trainer.deterministic",
            "checkpoint.optimizer"]


def _field_types(node: type = schema.Config, prefix: str = "") -> dict[str, str]:
    """key -> the annotation of its field in finetune/compose/schema.py (as written), at any depth
    (trainer.early_stopping.patience)."""
    hints = typing.get_type_hints(node)
    found: dict[str, str] = {}
    for f in dataclasses.fields(node):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found |= _field_types(kind, f"{prefix}{f.name}.")
        else:
            found[f"{prefix}{f.name}"] = str(f.type)
    return found


TYPES = _field_types()


def _is_int(key: str) -> bool:
    kind = TYPES[key]
    return "int" in kind and "float" not in kind


def _outside(allowed: Range, whole: bool) -> list[float]:
    """Values just past each end of the range (and NaN/inf for a float)."""
    step = 1 if whole else 1e-3
    values: list[float] = []
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - step)
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + step)
    return values + ([] if whole else [math.nan, math.inf])


def _inside(key: str, allowed: Range, whole: bool, high: dict[str, float]) -> st.SearchStrategy:
    low = allowed.low if allowed.low is not None else 0
    top = high.get(key, allowed.high if allowed.high is not None else low + 10)
    if allowed.high is not None:
        top = min(top, allowed.high)
    if whole:
        return st.integers(int(low) + allowed.low_open, int(top) - (allowed.high == top
                                                                    and allowed.high_open))
    return st.floats(low, top, exclude_min=allowed.low_open,
                     exclude_max=allowed.high_open and allowed.high == top,
                     allow_nan=False, width=32)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else repr(value))
    return str(value)


def _value(key: str) -> st.SearchStrategy:
    if key in RANGES:
        allowed, whole = RANGES[key], _is_int(key)
        outside = st.sampled_from([int(v) if whole else v for v in _outside(allowed, whole)])
        if key in ONLY_OUTSIDE:
            return outside
        return st.one_of(_inside(key, allowed, whole, CHEAP_HIGH), outside)
    if key in ITEM_RANGES:
        allowed = ITEM_RANGES[key]
        whole = key == "head.hidden"
        size = {"optim.betas": 2, "data.mean": 3, "data.std": 3}.get(key)
        item = st.one_of(_inside(key, allowed, whole, ITEM_HIGH),
                         st.sampled_from([int(v) if whole else v
                                          for v in _outside(allowed, whole)]))
        return st.lists(item, min_size=size or 0, max_size=size or 2)
    if key in BOOLEANS:
        return st.booleans()
    return st.sampled_from([*schema.choices_of(key), "nonsense"])


CHOICE_KEYS = [k for k in [*schema.TABLE_KEYS, *schema.CHOICES]
               if k not in ("data.name", "weights.source")]  # those need paths: tested apart
KEYS = sorted({*RANGES, *ITEM_RANGES, *BOOLEANS, *CHOICE_KEYS})


@st.composite
def overrides(draw: st.DrawFn) -> list[str]:
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
    return [f"{key}={_text(draw(_value(key)))}" for key in keys]


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(drawn=overrides())
def test_validate_is_the_plan(drawn: list[str]) -> None:
    keys = {o.partition("=")[0] for o in drawn}
    base = [o for o in [*QUICK[1:], *TINY] if o.partition("=")[0] not in keys]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = finetune.train("quickstart", [*base, *drawn], run_dir=Path(tmp) / "run")
        except FinetuneError as err:
            event("refused")
            assert err.problems, drawn
            assert all(p.strip() and "\n" not in p for p in err.problems), (drawn, err.problems)
            return
    event("ran")
    metrics = result.metrics
    assert metrics["status"] == "complete", (drawn, metrics)
    numbers = [v for v in metrics.values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers), (drawn, metrics)
    if "head.type=none" not in drawn and "trainer.limit_val_batches=0" not in drawn:
        assert metrics.get("val/acc") is not None, (drawn, metrics)
