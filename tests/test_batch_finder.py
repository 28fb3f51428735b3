"""data.batch_size=auto: Lightning's batch-size finder on the run's model and data; refused
in one sentence where it cannot apply. A CPU never runs out of memory before it swaps, so
the finder's search is tested here where it stops: at its limit or at the training set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.compose.prepare import compose_config
from finetune.errors import ConfigError
from finetune.rundir.verdict import speed_line
from finetune.training.batch_finder import START, find_batch_size
from finetune.training.lightning_module import FinetuneModule
from finetune.training.lr_finder import find_lr
from finetune.training.plan import plan_run
from tests.conftest import QUICK, SHRINK, problems_here


def _problems(*overrides: str) -> list[str]:
    cfg, _ = compose_config(["weights.source=none", "data=digits", "data.image_size=32",
                             *overrides])
    return plan_run(cfg, load=False).problems


def test_where_the_finder_cannot_run_it_is_one_sentence_each_all_at_once() -> None:
    problems = _problems("data.batch_size=auto", "trainer.accelerator=cpu",
                         "trainer.strategy=ddp", "trainer.devices=2",
                         "freeze.train_from=layer4",
                         "freeze.unfreeze=[{epoch: 2, train_from: layer3}]")
    said = [p for p in problems if p.startswith("data.batch_size=auto")]
    assert len(said) == 3
    assert any(" on CPU: " in p for p in said)
    assert any("several processes (DDP)" in p for p in said)
    assert any("freeze.unfreeze" in p for p in said)


@pytest.mark.parametrize("value", ["big", "3.5", "true", "null"])
def test_a_batch_that_is_not_a_number_or_auto_is_one_sentence(value: str) -> None:
    with pytest.raises(ConfigError) as stopped:
        _problems(f"data.batch_size={value}")
    assert any("data.batch_size=" in p and "give a whole number of images per step" in p
               for p in stopped.value.problems), stopped.value.problems


@pytest.mark.parametrize("value", ["64", "auto", "AUTO"])
def test_a_number_or_auto_composes(value: str) -> None:
    cfg, _ = compose_config(["weights.source=none", f"data.batch_size={value}"])
    assert str(cfg.data.batch_size) == value


def test_resume_and_detection_refuse_it(tmp_path: Path) -> None:
    resumed = problems_here(*QUICK, *SHRINK, "data.batch_size=auto", "trainer.accelerator=gpu",
                            f"resume={tmp_path / 'old'}", run_dir=tmp_path / "r")
    assert any(p.startswith("data.batch_size=auto with resume") for p in resumed), resumed
    cfg, _ = compose_config(["recipe=digits_detection", "weights.source=none",
                             "data.batch_size=auto", "trainer.accelerator=gpu"])
    detection = plan_run(cfg, load=False).problems
    assert any(p.startswith("data.batch_size=auto with task=detection") for p in detection)


def _planned(*overrides: str):
    cfg, _ = compose_config([*QUICK, "data.batch_size=8", *overrides])
    plan = plan_run(cfg, load=False)
    assert not plan.problems, plan.problems
    built, data = plan.built, plan.data

    def make_module() -> FinetuneModule:
        return FinetuneModule(built.model, len(data.class_names), plan.freeze, cfg.optim,
                              cfg.sched, groups=plan.groups)

    return cfg, data, built.model, make_module


@pytest.mark.parametrize(("limit", "train_size", "found", "stopped"), [
    (16, None, 16, "the limit"),
    (4096, 24, 24, "the training set's size"),
])
def test_the_finder_sets_the_batch_and_leaves_the_model_as_it_was(
        limit: int, train_size: int | None, found: int, stopped: str, tmp_path: Path) -> None:
    cfg, data, model, make_module = _planned(
        *([f"data.train_size={train_size}"] if train_size else []))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data.start_epoch = 3
    result = find_batch_size(cfg, data, tmp_path, make_module, limit=limit)
    assert result == {"found": found, "stopped_at": stopped, "start": START,
                      "steps_per_trial": 3, "limit": limit}
    assert cfg.data.batch_size == data.batch_size == found
    assert len(next(iter(data.train_dataloader()))[0]) == found
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # trained, then restored
    assert data.start_epoch == 3  # the finder's checkpoint does not move the run's epoch
    assert not list(tmp_path.glob("*.ckpt"))  # its checkpoint removed
    line = speed_line({"train_images_per_second": 10.0, "batch_size_finder": result})
    assert f"batch {found} (data.batch_size=auto: {stopped})" in line


def test_the_learning_rate_finder_also_leaves_the_runs_first_epoch(tmp_path: Path) -> None:
    """Lightning restores its checkpoint into the datamodule too, whose state is the epoch a
    resumed run starts at: a run whose loader workers start before set_epoch would begin at
    the wrong epoch's order."""
    cfg, data, _, make_module = _planned("optim.lr=auto", "data.train_size=64")
    data.start_epoch = 0
    find_lr(cfg, data, tmp_path, make_module)
    assert data.start_epoch == 0
