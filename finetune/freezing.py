"""Which parameters train: the split point `freeze.train_from` and the BatchNorm policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from finetune.errors import FinetuneError
from finetune.surgery import get_module

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class FreezePlan:
    """The outcome of a freeze config, as data: names only, no tensors."""

    train_from: str | None
    frozen: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    eval_modules: list[str] = field(default_factory=list)


def resolve_train_from(model: nn.Module, train_from: Any) -> str | None:
    """A module path, or a top-level child index (negative counts from the end) -> a path."""
    if train_from is None:
        return None
    children = [name for name, _ in model.named_children()]
    if isinstance(train_from, int) and not isinstance(train_from, bool):
        if not -len(children) <= train_from < len(children):
            raise FinetuneError(f"freeze.train_from={train_from}: the model has {len(children)} "
                                f"top-level children (0..{len(children) - 1}): "
                                f"{', '.join(children)}")
        return children[train_from]
    path = str(train_from)
    get_module(model, path, key="freeze.train_from")
    return path


def plan_freeze(model: nn.Module, train_from: Any, bn: str = "frozen") -> FreezePlan:
    """Freeze everything before `train_from` in module order (parameters and, by `bn`, BN stats).

    Module order is registration order, so `train_from: layer3` on a ResNet freezes conv1, bn1,
    layer1 and layer2 -- what the classic loop over `model.children()` with a counter does.
    """
    start = resolve_train_from(model, train_from)
    plan = FreezePlan(train_from=start)
    modules = list(model.named_modules())
    names = [name for name, _ in modules]
    cut = names.index(start) if start is not None else 0
    for i, (name, module) in enumerate(modules):
        before = i < cut
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}" if name else param_name
            (plan.frozen if before else plan.trainable).append(full)
        is_ancestor = start is not None and (name == "" or start.startswith(f"{name}."))
        if before and not is_ancestor and bn == "frozen" and isinstance(module, BATCHNORM):
            plan.eval_modules.append(name)
    if not plan.trainable:
        raise FinetuneError(f"freeze.train_from={train_from!r} leaves nothing to train; "
                            "pick an earlier module, or null to train everything")
    return plan


def apply_freeze(model: nn.Module, plan: FreezePlan) -> None:
    """Set requires_grad from the plan and put the frozen BatchNorm layers in eval mode."""
    frozen = set(plan.frozen)
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    keep_eval(model, plan.eval_modules)


def keep_eval(model: nn.Module, module_names: list[str]) -> None:
    """Put these modules in eval mode (called after every model.train())."""
    for name in module_names:
        model.get_submodule(name).eval()
