"""The plain split `freeze.train_from` and frozen BatchNorm."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

from finetune.errors import FinetuneError
from finetune.training.freezing import apply_freeze, plan_freeze


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


# -- the selector grammar -------------------------------------------------------------------

def test_selectors_path_glob_index_and_list() -> None:
    from finetune.models.selectors import select_modules

    model = torchvision.models.resnet18()
    assert select_modules(model, "layer3.1", "k") == ["layer3.1"]
    globbed = select_modules(model, "layer[12]*", "k")
    assert "layer1" in globbed and "layer2.1.bn2" in globbed and "layer3" not in globbed
    assert set(select_modules(model, "*.bn*", "k")) == {
        n for n, _ in model.named_modules() if ".bn" in n}
    assert select_modules(model, 6, "k") == ["layer3"]
    assert select_modules(model, ["fc", -2], "k") == ["avgpool", "fc"]
    with pytest.raises(FinetuneError, match="'blocks\\*' matches no module"):
        select_modules(model, "blocks*", "freeze.modules")


def test_freeze_modules_freezes_by_glob_anywhere() -> None:
    model = torchvision.models.resnet18()
    plan = plan_freeze(model, None, modules=["*.bn*", "bn1", "*.downsample.1"])
    bn_params = {f"{n}.{p}" for n, m in model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert set(plan.frozen) == bn_params
    assert len(plan.eval_modules) == len(bn_params) // 2


def test_bn_policies() -> None:
    frozen = plan_freeze(torchvision.models.resnet18(), "layer3", bn="frozen")
    train = plan_freeze(torchvision.models.resnet18(), "layer3", bn="train")
    affine = plan_freeze(torchvision.models.resnet18(), "layer3", bn="affine")
    assert "layer2.1.bn2" in frozen.eval_modules and "layer2.1.bn2.weight" in frozen.frozen
    assert train.eval_modules == [] and "layer2.1.bn2.weight" in train.frozen
    assert affine.eval_modules == frozen.eval_modules
    assert "layer2.1.bn2.weight" in affine.trainable and "layer2.1.conv2.weight" in affine.frozen
    with pytest.raises(FinetuneError, match="not one of frozen, train, affine"):
        plan_freeze(torchvision.models.resnet18(), "layer3", bn="stats")


# -- unfreeze phases ------------------------------------------------------------------------

def test_phases_open_the_network_stage_by_stage() -> None:
    model = torchvision.models.resnet18()
    plan = plan_freeze(model, "fc", unfreeze=[
        {"epoch": 2, "train_from": "layer4"},
        {"epoch": 4, "modules": ["layer[123]", "conv1", "bn1"], "name": "early", "lr": 1e-4}])
    assert [s.epoch for s in plan.stages] == [0, 2, 4]
    assert [s.name for s in plan.stages] == ["fc", "layer4", "early"]
    assert plan.stages[1].params[0] == "layer4.0.conv1.weight"
    assert len(plan.stages[2].trainable) == len(list(model.parameters()))
    assert plan.stages[2].eval_modules == [] and "layer3.1.bn2" in plan.stages[1].eval_modules
    assert plan.stages_until(0) == 1 and plan.stages_until(3) == 2 and plan.stages_until(9) == 3
    every = [n for s in plan.stages for n in s.params]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each once


@pytest.mark.parametrize(("train_from", "phases", "message"), [
    ("fc", [{"epoch": 1, "train_from": "fc"}], "unfreezes nothing new"),
    ("fc", [{"epoch": 3, "train_from": "layer4"}, {"epoch": 1, "train_from": 0}],
     "list phases in epoch order"),
    ("fc", [{"epoch": 1}], "exactly one of train_from"),
    ("fc", [{"epoch": 1, "train_from": "layer4", "modules": "layer3"}], "exactly one of"),
    ("fc", [{"epoch": 1, "modules": "layer9"}], "'layer9' matches no module.*did you mean"),
    ("fc", [{"epoch": 1, "train_from": "layer4", "lr": 1.0, "lr_mult": 2.0}], "not both"),
])
def test_bad_phases_say_what_is_wrong(train_from: str, phases: list, message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        plan_freeze(torchvision.models.resnet18(), train_from, unfreeze=phases)


def test_everything_frozen_fails_unless_a_phase_starts_at_once() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(FinetuneError, match=r"leaves nothing to train and no freeze\.unfreeze"):
        plan_freeze(model, None, modules=["*"])
    with pytest.raises(FinetuneError, match="nothing trains before epoch 2"):
        plan_freeze(model, None, modules=["*"], unfreeze=[{"epoch": 2, "modules": "fc"}])
    plan = plan_freeze(model, None, modules=["*"], unfreeze=[{"epoch": 0, "modules": "fc"}])
    assert plan.stages_until(0) == 2


def test_config_level_schedule_mistakes_are_reported_together() -> None:
    from finetune.compose.prepare import compose_config
    from finetune.errors import ConfigError
    from finetune.training.validate import validate

    cfg, _ = compose_config(["recipe=quickstart", "trainer.max_epochs=3",
                             "freeze.unfreeze=[{epoch:3,train_from:layer4}]",
                             "optim.layer_decay=1.5", "optim.nesterov=true"])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    problems = caught.value.problems
    assert len(problems) == 3
    assert problems[0] == ("optim.layer_decay=1.5: must be in (0, 1] (conf/config.yaml gives "
                           "each key's range)")
    assert problems[1].startswith("freeze.unfreeze[0]: epoch 3 is never reached (the run has "
                                  "3 epochs, 0..2)")
    assert "optim.nesterov=true needs" in problems[2]
