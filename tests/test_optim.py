"""Optimizer groups (selectors, first match wins, no_decay, layer_decay) and the schedule,
including groups that join mid-run."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from finetune.compose.schema import OptimConfig, SchedConfig
from finetune.errors import FinetuneError
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.optim import (
    WARMUP_START,
    Schedule,
    build_optimizer,
    build_scheduler,
    layer_units,
    param_groups,
    plan_groups,
    torch_groups,
)


def _optim(**kwargs) -> OptimConfig:
    """The optim group as a run composes it (schema + values)."""
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), kwargs)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizer_gets_only_trainable_parameters(name: str) -> None:
    model = torchvision.models.resnet18()
    plan = plan_freeze(model, "layer4")
    apply_freeze(model, plan)
    optimizer = build_optimizer(model, _optim(name=name, lr=0.01), plan)
    given = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(given) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert type(optimizer).__name__.lower() == name


def test_optimizer_arguments_reach_the_optimizer() -> None:
    model = torchvision.models.resnet18()
    sgd = build_optimizer(model, _optim(name="sgd", momentum=0.8, nesterov=True))
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    adam = build_optimizer(model, _optim(name="adam", betas=[0.8, 0.9], eps=1e-6))
    assert adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["eps"] == 1e-6
    rms = build_optimizer(model, _optim(name="rmsprop", alpha=0.9, momentum=0.5))
    assert rms.defaults["alpha"] == 0.9 and rms.defaults["momentum"] == 0.5


def _names(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_every_trainable_parameter_is_in_exactly_one_group_first_match_wins() -> None:
    model = torchvision.models.resnet18()
    plan = plan_freeze(model, "layer2")
    apply_freeze(model, plan)
    cfg = _optim(lr=0.1, weight_decay=0.05, groups=[
        {"modules": "layer4.1", "name": "late", "lr": 0.5},
        {"modules": "layer[34]*", "lr_mult": 0.1, "weight_decay": 0.0},  # layer4.1 taken above
        {"modules": "fc", "name": "head", "lr": 1.0},
    ])
    groups = param_groups(model, cfg, plan, 1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    by_name = _names(groups)
    assert by_name["late"]["lr"] == 0.5 and by_name["late/no_decay"]["weight_decay"] == 0.0
    assert by_name["late"]["weight_decay"] == 0.05
    glob = by_name["layer[34]*"]  # weight_decay 0 for the group: no no_decay split needed
    assert glob["lr"] == pytest.approx(0.01) and glob["weight_decay"] == 0.0
    assert not any(id(p) == id(model.layer4[1].conv1.weight) for p in glob["params"])
    assert by_name["head"]["lr"] == 1.0
    assert by_name["layer2"]["lr"] == 0.1  # the rest: named after the split point
    assert "layer2/no_decay" in by_name


def test_no_decay_takes_biases_and_norm_layers() -> None:
    model = torchvision.models.resnet18()
    groups = _names(param_groups(model, _optim(weight_decay=0.1), plan_freeze(model), 1))
    plain = {id(p) for p in groups["all/no_decay"]["params"]}
    assert id(model.bn1.weight) in plain and id(model.fc.bias) in plain
    assert id(model.conv1.weight) not in plain and id(model.fc.weight) not in plain
    assert groups["all"]["weight_decay"] == 0.1 and groups["all/no_decay"]["weight_decay"] == 0
    # A glob over parameter names, and no split without weight decay
    vit = torchvision.models.vit_b_16()
    vit_groups = _names(param_groups(vit, _optim(weight_decay=0.1, no_decay=["*pos_embedding",
                                                                             "class_token"]),
                                     plan_freeze(vit), 1))
    assert {id(p) for p in vit_groups["all/no_decay"]["params"]} == {
        id(vit.class_token), id(vit.encoder.pos_embedding)}
    assert len(param_groups(model, _optim(weight_decay=0.0), plan_freeze(model), 1)) == 1


def test_layer_decay_gives_front_layers_the_smallest_rates() -> None:
    model = torchvision.models.resnet18()
    units = layer_units(model)
    assert units[:4] == ["conv1", "bn1", "layer1.0", "layer1.1"] and units[-1] == "fc"
    groups = param_groups(model, _optim(lr=1.0, layer_decay=0.5), plan_freeze(model), 1)
    lr_of = {g["name"].split("/")[1]: g["lr"] for g in groups}
    assert lr_of["fc"] == 1.0 and lr_of["layer4.1"] == 0.5
    assert lr_of["conv1"] == pytest.approx(0.5 ** (len(units) - 1))
    rates = [lr_of[u] for u in units]
    assert all(a < b for a, b in itertools.pairwise(rates))
    vit_units = layer_units(torchvision.models.vit_b_16())
    assert "encoder.layers.encoder_layer_11" in vit_units and vit_units[-1] == "heads.head"
    assert "features.0" in layer_units(torchvision.models.vgg16())


def test_group_selector_that_matches_nothing_is_refused() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(FinetuneError, match=r"optim.groups\[0\].modules: 'blocks\*' matches "
                                            "no module"):
        param_groups(model, _optim(groups=[{"modules": "blocks*", "lr": 1.0}]),
                     plan_freeze(model), 1)
    with pytest.raises(FinetuneError, match="lr or lr_mult, not both"):
        param_groups(model, _optim(groups=[{"modules": "fc", "lr": 1.0, "lr_mult": 2.0}]),
                     plan_freeze(model), 1)


# -- the schedule ---------------------------------------------------------------------------

def _epoch(optimizer: torch.optim.Optimizer, config: dict, steps: int) -> None:
    """One epoch of `steps` optimizer steps, stepping the schedule as Lightning does."""
    for _ in range(steps):
        optimizer.step()
        if config["interval"] == "step":
            config["scheduler"].step()
    if config["interval"] == "epoch":
        config["scheduler"].step()


def _run(sched: str, warmup: int = 0, epochs: int = 6, steps: int = 4,
         losses: list[float] | None = None) -> list[float]:
    """The lr at the start of each epoch, stepping as Lightning does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = OmegaConf.structured(SchedConfig(name=sched, warmup_epochs=warmup, step_size=2,
                                           patience=1))
    config = build_scheduler(optimizer, cfg, epochs, epochs * steps)
    schedule = config["scheduler"]
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        _epoch(optimizer, config, steps)
        schedule.observe((losses or [1.0] * epochs)[epoch])
    return lrs


def test_every_schedule_shapes_the_lr() -> None:
    assert _run("none") == [1.0] * 6
    cosine = _run("cosine")
    assert cosine[0] == 1.0 and all(a > b for a, b in itertools.pairwise(cosine))
    assert cosine[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert _run("step")[:5] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    onecycle = _run("onecycle")
    assert onecycle[0] == pytest.approx(1 / 25) and max(onecycle) > 0.9
    assert onecycle[-1] < onecycle[2]
    # val/loss stops improving after epoch 1; patience 1 (as torch's ReduceLROnPlateau):
    # the second bad epoch (3) drops the rate for epoch 4, then the count starts over
    plateau = _run("plateau", losses=[3.0, 2.0, 2.5, 2.5, 2.5, 2.5, 2.5])
    assert plateau == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1])


@pytest.mark.parametrize("sched", ["none", "cosine", "step", "plateau"])
def test_warmup_ramps_up_from_a_small_lr(sched: str) -> None:
    lrs = _run(sched, warmup=2)
    assert lrs[0] == pytest.approx(WARMUP_START)
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)


@pytest.mark.parametrize("sched", ["none", "cosine", "step", "onecycle", "plateau"])
def test_every_schedule_keeps_working_when_a_group_joins(sched: str) -> None:
    """Unfreeze at epoch 2: the new named group gets its own base rate x the schedule's
    factor x its warm-up ramp, and both groups keep following the schedule after."""
    model = torchvision.models.resnet18()
    plan = plan_freeze(model, "fc", unfreeze=[{"epoch": 2, "train_from": "layer4",
                                               "lr_mult": 0.1, "warmup_epochs": 2}])
    apply_freeze(model, plan)
    cfg = _optim(name="sgd", lr=1.0)
    optimizer = build_optimizer(model, cfg, plan)
    steps = 3
    config = build_scheduler(optimizer, OmegaConf.structured(SchedConfig(name=sched,
                                                                         step_size=1)),
                             5, 5 * steps)
    schedule: Schedule = config["scheduler"]
    seen: dict[str, list[float]] = {"fc": [], "layer4": []}
    for epoch in range(5):
        if epoch == 2:
            schedule.add_groups(torch_groups([g for g in plan_groups(model, cfg, plan)
                                              if g.stage == 1], model))
        for group in optimizer.param_groups:
            seen[group["name"]].append(group["lr"])
        _epoch(config["scheduler"].optimizer, config, steps)
        schedule.observe(10.0 - epoch)  # improving: plateau keeps its rate
    assert [g["name"] for g in optimizer.param_groups] == ["fc", "layer4"]
    factor = seen["fc"][2]  # the schedule's value at epoch 2 (base lr 1.0)
    assert seen["layer4"][0] == pytest.approx(0.1 * factor * WARMUP_START)
    ramp_mid = WARMUP_START + (1 - WARMUP_START) * 0.5
    assert seen["layer4"][1] == pytest.approx(0.1 * seen["fc"][3] * ramp_mid)
    assert seen["layer4"][2] == pytest.approx(0.1 * seen["fc"][4])
    state = schedule.state_dict()  # plain data: a checkpoint loads it with weights_only
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["last_epoch"] == state["last_epoch"]


def test_no_decay_norm_means_every_normalization_layer() -> None:
    """`norm` covers LayerNorm (ViT) and GroupNorm, not only BatchNorm."""
    vit = torchvision.models.vit_b_16()
    groups = _names(param_groups(vit, _optim(weight_decay=0.1, no_decay=["norm"]),
                                 plan_freeze(vit), 1))
    plain = {id(p) for p in groups["all/no_decay"]["params"]}
    assert id(vit.encoder.ln.weight) in plain and id(vit.encoder.layers[0].ln_1.bias) in plain
    assert id(vit.heads.head.weight) not in plain
    grouped = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8))
    groups = _names(param_groups(grouped, _optim(weight_decay=0.1, no_decay=["norm"]),
                                 plan_freeze(grouped), 1))
    assert {id(p) for p in groups["all/no_decay"]["params"]} == {
        id(grouped[1].weight), id(grouped[1].bias)}
