"""Optimizers over trainable parameters only; every scheduler, with and without warm-up."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from finetune.config import OptimConfig, SchedConfig
from finetune.errors import FinetuneError
from finetune.freezing import apply_freeze, plan_freeze
from finetune.optim import WARMUP_START, build_optimizer, build_scheduler


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizer_gets_only_trainable_parameters(name: str) -> None:
    model = torchvision.models.resnet18()
    apply_freeze(model, plan_freeze(model, "layer4"))
    optimizer = build_optimizer(model, OmegaConf.structured(OptimConfig(name=name, lr=0.01)))
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert given == {id(p) for p in model.parameters() if p.requires_grad}
    assert type(optimizer).__name__.lower() == name


def _lrs(sched: str, warmup: int, epochs: int = 6, steps: int = 4) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    cfg = OmegaConf.structured(SchedConfig(name=sched, warmup_epochs=warmup, step_size=2))
    config = build_scheduler(optimizer, cfg, epochs, epochs * steps)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps):
            optimizer.step()
            if config and config["interval"] == "step":
                config["scheduler"].step()
        if config and config["interval"] == "epoch":
            sched_obj = config["scheduler"]
            sched_obj.step(1.0) if sched == "plateau" else sched_obj.step()
    return lrs


def test_every_schedule_runs_and_shapes_the_lr() -> None:
    assert _lrs("none", 0) == [1.0] * 6
    cosine = _lrs("cosine", 0)
    assert cosine[0] == 1.0 and all(a > b for a, b in itertools.pairwise(cosine))
    assert _lrs("step", 0)[:5] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert max(_lrs("onecycle", 0)) > _lrs("onecycle", 0)[0]
    plateau = _lrs("plateau", 0)  # val/loss never improves: the lr drops after patience
    assert plateau[0] == 1.0 and plateau[-1] < 1.0


@pytest.mark.parametrize("sched", ["none", "cosine", "step"])
def test_warmup_ramps_up_from_a_small_lr(sched: str) -> None:
    lrs = _lrs(sched, 2)
    assert lrs[0] == pytest.approx(WARMUP_START)
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)


def test_plateau_with_warmup_is_refused() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(FinetuneError, match=r"not supported with sched\.name=plateau"):
        build_scheduler(optimizer, OmegaConf.structured(SchedConfig(name="plateau",
                                                                    warmup_epochs=1)), 5, 10)
