"""Which parameters train, and when: the split `freeze.train_from`, extra frozen modules,
the BatchNorm policy, and the unfreeze phases -- all resolved up front into stages.

The *frozen region* is a set of modules: everything before `train_from` in module order
(registration order, so `train_from: layer3` on a ResNet freezes conv1, bn1, layer1 and
layer2, as the classic loop over `model.children()` with a counter does), plus `modules`.
A parameter is frozen when the module holding it is in the region. BatchNorm layers in the
region follow `bn`: `frozen` (eval mode, parameters frozen), `train` (statistics update,
parameters frozen) or `affine` (eval mode, weight and bias train). Each unfreeze phase
takes modules out of the region from its epoch on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from finetune.errors import FinetuneError
from finetune.models.selectors import (
    as_list,
    child_at,
    describe,
    inside,
    owner,
    select_modules,
)
from finetune.models.surgery import get_module
from finetune.training.bn_policies import BN_POLICIES

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class Stage:
    """What starts training at `epoch`: stage 0 is the start of the run, then one stage per
    unfreeze phase. `params` are the parameters that join at this stage (their optimizer
    groups are named after `name`); `trainable` and `eval_modules` hold from `epoch` on."""

    epoch: int
    name: str
    params: list[str]
    trainable: list[str]
    eval_modules: list[str]
    lr: float | None = None
    lr_mult: float | None = None
    warmup_epochs: int = 0
    selector: str = ""
    frozen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "name": self.name, "selector": self.selector,
                "params": len(self.params), "lr": self.lr, "lr_mult": self.lr_mult,
                "warmup_epochs": self.warmup_epochs}


@dataclass
class FreezePlan:
    """The outcome of a freeze config, as data: names only, no tensors."""

    train_from: str | None
    bn: str = "frozen"
    stages: list[Stage] = field(default_factory=list)

    @property
    def trainable(self) -> list[str]:
        """Trainable at the start of the run."""
        return self.stages[0].trainable

    @property
    def frozen(self) -> list[str]:
        """Frozen at the start of the run."""
        return self.stages[0].frozen

    @property
    def eval_modules(self) -> list[str]:
        return self.stages[0].eval_modules

    def stages_until(self, epoch: int) -> int:
        """How many stages have begun by the start of `epoch`."""
        return sum(1 for s in self.stages if s.epoch <= epoch)


def resolve_train_from(model: nn.Module, train_from: Any, key: str = "freeze.train_from"
                       ) -> str | None:
    """A module path, or a top-level child index (negative counts from the end) -> a path."""
    if train_from is None:
        return None
    if isinstance(train_from, int) and not isinstance(train_from, bool):
        return child_at(model, train_from, key)
    path = str(train_from)
    get_module(model, path, key=key)
    return path


def before(model: nn.Module, start: str) -> set[str]:
    """Modules before `start` in module order, without its ancestors (which hold it)."""
    names = [name for name, _ in model.named_modules()]
    cut = names.index(start)
    return {n for n in names[1:cut] if not start.startswith(f"{n}.")}


def held_before(model: nn.Module, start: str) -> set[str]:
    """Ancestors of `start` whose own parameters are frozen with the prefix: those with a
    child before the branch that leads to `start`. A module's own parameters come before its
    children (a ViT's class token and position embedding, on the model or its encoder,
    are used before the blocks): `train_from: blocks.6` freezes them, `train_from:
    patch_embed` (the first child) does not."""
    held = set()
    parts = start.split(".")
    for depth in range(len(parts)):
        ancestor = ".".join(parts[:depth])
        children = [n for n, _ in model.get_submodule(ancestor).named_children()]
        if children.index(parts[depth]) > 0:
            held.add(ancestor)
    return held


def _state(model: nn.Module, region: set[str], bn: str, held: set[str] | None = None
           ) -> tuple[list[str], list[str]]:
    """(trainable parameters, BatchNorm modules kept in eval) for a frozen region, and the
    ancestors of the split point whose own parameters are frozen (`held`)."""
    policy = BN_POLICIES[bn]
    trainable = []
    bn_modules = {n for n, m in model.named_modules() if isinstance(m, BATCHNORM)}
    for name, _ in model.named_parameters():
        holder = owner(name)
        frozen = (inside(holder, region) or holder in (held or ())) and not (
            policy.trains_affine and holder in bn_modules)
        if not frozen:
            trainable.append(name)
    eval_modules = [n for n in sorted(bn_modules, key=_order(model))
                    if inside(n, region)] if policy.fixed_stats else []
    return trainable, eval_modules


def _order(model: nn.Module) -> Any:
    index = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda name: index[name]


def plan_freeze(model: nn.Module, train_from: Any = None, bn: str = "frozen",
                modules: Any = None, unfreeze: Any = (), *,
                frozen_region: set[str] | None = None, frozen_own: set[str] | None = None
                ) -> FreezePlan:
    """Resolve the freeze config against the model: every selector checked, every stage's
    trainable set computed.

    `frozen_region` and `frozen_own` freeze more from the start: modules (with what they
    hold) and modules' own parameters only ("" for the model's), as an adapter's base model
    is (finetune/models/adapters.py); unfreeze phases take them out as they do the rest.

    Raises:
        FinetuneError: a selector that matches nothing, nothing trainable at the start, or a
            phase that unfreezes nothing new.
    """
    if bn not in BN_POLICIES:
        raise FinetuneError(f"freeze.bn={bn!r} is not one of {', '.join(BN_POLICIES)}")
    start = resolve_train_from(model, train_from)
    region = (before(model, start) if start is not None else set()) | set(frozen_region or ())
    held = (held_before(model, start) if start is not None else set()) | set(frozen_own or ())
    if as_list(modules):
        region |= set(select_modules(model, modules, "freeze.modules"))
    trainable, eval_modules = _state(model, region, bn, held)
    all_params = [n for n, _ in model.named_parameters()]
    first = Stage(0, start or "all", trainable, trainable, eval_modules,
                  warmup_epochs=0, selector=f"train_from: {start}" if start else "all")
    stages = [first]
    phases = list(unfreeze or [])
    if not trainable:
        if not phases:
            raise FinetuneError(f"freeze.train_from={train_from!r} leaves nothing to train and no "
                                "freeze.unfreeze phase follows; pick an earlier module, or null "
                                "to train everything")
        first_epoch = min(int(_get(p, "epoch", 0)) for p in phases)
        if first_epoch > 0:
            raise FinetuneError(f"nothing trains before epoch {first_epoch} (freeze.unfreeze's "
                                "first phase); train something from the start or begin the "
                                "schedule at epoch 0")
    last_epoch = 0
    for i, phase in enumerate(phases):
        key = f"freeze.unfreeze[{i}]"
        epoch = _get(phase, "epoch", None)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise FinetuneError(f"{key}: epoch={epoch!r}; give the 0-based epoch the phase "
                                "starts at, e.g. {epoch: 3, train_from: layer3}")
        if epoch < last_epoch:
            raise FinetuneError(f"{key}: epoch {epoch} comes before the previous phase's "
                                f"epoch {last_epoch}; list phases in epoch order")
        last_epoch = epoch
        phase_from, phase_modules = _get(phase, "train_from", None), _get(phase, "modules", None)
        if (phase_from is None) == (not as_list(phase_modules)):
            raise FinetuneError(f"{key}: give exactly one of train_from (a split point) or "
                                "modules (selectors) to say what unfreezes")
        lr, lr_mult = _get(phase, "lr", None), _get(phase, "lr_mult", None)
        if lr is not None and lr_mult is not None:
            raise FinetuneError(f"{key}: give lr or lr_mult, not both")
        if phase_from is not None:
            path = resolve_train_from(model, phase_from, f"{key}.train_from")
            assert path is not None
            region &= before(model, path)
            held &= held_before(model, path)
            selector, default_name = f"train_from: {path}", path
        else:
            chosen = select_modules(model, phase_modules, f"{key}.modules")
            region = {n for n in region if not inside(n, chosen)}
            held = {n for n in held if not inside(n, chosen)}
            selector = default_name = describe(phase_modules)
        trainable, eval_modules = _state(model, region, bn, held)
        previous = set(stages[-1].trainable)
        new = [n for n in trainable if n not in previous]
        if not new:
            raise FinetuneError(f"{key} ({selector}) unfreezes nothing new at epoch {epoch}: "
                                "everything it selects already trains")
        stages.append(Stage(epoch, str(_get(phase, "name", None) or default_name), new,
                            trainable, eval_modules, lr, lr_mult,
                            int(_get(phase, "warmup_epochs", 0) or 0), selector))
    for stage in stages:
        kept = set(stage.trainable)
        stage.frozen = [n for n in all_params if n not in kept]
    return FreezePlan(train_from=start, bn=bn, stages=stages)


def _get(phase: Any, key: str, default: Any) -> Any:
    value = phase.get(key, default) if hasattr(phase, "get") else getattr(phase, key, default)
    return default if value is None else value


def apply_stage(model: nn.Module, plan: FreezePlan, stages: int) -> Stage:
    """Set requires_grad and BatchNorm modes as they are once `stages` stages have begun."""
    stage = plan.stages[max(0, stages - 1)]
    trainable = set(stage.trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    if model.training:
        for module in model.modules():
            if isinstance(module, BATCHNORM):
                module.train()
    keep_eval(model, stage.eval_modules)
    return stage


def apply_freeze(model: nn.Module, plan: FreezePlan) -> None:
    """The state at the start of the run."""
    apply_stage(model, plan, 1)


def keep_eval(model: nn.Module, module_names: list[str]) -> None:
    """Put these modules in eval mode (called after every model.train())."""
    for name in module_names:
        model.get_submodule(name).eval()
