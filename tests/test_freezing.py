"""The plain split `freeze.train_from` and frozen BatchNorm."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

from finetune.errors import FinetuneError
from finetune.freezing import apply_freeze, plan_freeze


def _classic_children_counter(model: nn.Module) -> set[str]:
    """The loop people write: freeze the first six children, train the rest."""
    count = 0
    for child in model.children():  # written the way people write it
        count += 1  # noqa: SIM113
        if count < 7:
            for param in child.parameters():
                param.requires_grad = False
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_from", ["layer3", 6])
def test_split_equals_the_classic_children_counter(train_from: object) -> None:
    expected = _classic_children_counter(torchvision.models.resnet50())
    model = torchvision.models.resnet50()
    plan = plan_freeze(model, train_from)
    apply_freeze(model, plan)
    assert plan.train_from == "layer3"
    assert set(plan.trainable) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_frozen_batchnorm_is_in_eval_mode() -> None:
    model = torchvision.models.resnet18()
    plan = plan_freeze(model, "layer3")
    model.train()
    apply_freeze(model, plan)
    frozen_bn = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
                 and not m.training}
    assert frozen_bn == set(plan.eval_modules)
    assert "bn1" in frozen_bn and "layer2.1.bn2" in frozen_bn and "layer3.0.bn1" not in frozen_bn


def test_bn_train_policy_keeps_stats_updating() -> None:
    plan = plan_freeze(torchvision.models.resnet18(), "layer3", bn="train")
    assert plan.eval_modules == [] and "bn1.weight" in plan.frozen


def test_null_trains_everything_and_negative_index_counts_from_the_end() -> None:
    model = torchvision.models.resnet18()
    assert plan_freeze(model, None).frozen == []
    assert plan_freeze(model, -1).trainable == ["fc.weight", "fc.bias"]


def test_unknown_path_suggests_the_closest() -> None:
    with pytest.raises(FinetuneError, match="did you mean 'layer4'"):
        plan_freeze(torchvision.models.resnet18(), "layer5")
    with pytest.raises(FinetuneError, match="has 10 top-level children"):
        plan_freeze(torchvision.models.resnet18(), 12)
