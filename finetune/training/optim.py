"""Named optimizer parameter groups, and one learning-rate schedule that keeps working when
groups join mid-run.

Every trainable parameter is in exactly one group. A parameter's group comes from, in order:
the first `optim.groups` entry whose selector holds it (first match wins); else the unfreeze
phase it joined at; else the start of the run. `optim.layer_decay` splits groups by layer,
`optim.no_decay` by whether weight decay applies. Frozen parameters are never handed to the
optimizer, so momentum and weight decay cannot move them.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from finetune.errors import FinetuneError
from finetune.models.selectors import as_list, describe, inside, owner, select_modules
from finetune.registry import make_optimizer
from finetune.training.freezing import FreezePlan, Stage, plan_freeze
from finetune.training.schedules import SCHEDULES, LRShape

LR_AUTO = "auto"  # optim.lr: found by the learning-rate finder (finetune/training/lr_finder.py)
LR_PLACEHOLDER = 1.0e-3  # the rate an optim.lr=auto run is planned at until it is found
# Warm-up starts from this fraction of the configured learning rate.
WARMUP_START = 0.01
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
               nn.LocalResponseNorm, nn.RMSNorm)
CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass
class GroupSpec:
    """One `optim.groups` entry, resolved against the model."""

    name: str
    modules: list[str]
    lr: float | None
    lr_mult: float | None
    weight_decay: float | None


def is_auto(value: Any) -> bool:
    """Whether an `optim.lr` value asks for the learning-rate finder."""
    return isinstance(value, str) and value.strip().lower() == LR_AUTO


def base_lr(cfg: Any) -> float:
    """`optim.lr` as a number: the placeholder while `auto` is not found yet (and for a value
    that is not a rate, which the plan reports as a problem of its own)."""
    lr = cfg.lr
    return float(lr) if isinstance(lr, int | float) and not isinstance(lr, bool) \
        else LR_PLACEHOLDER


def group_specs(model: nn.Module, entries: Any) -> list[GroupSpec]:
    specs = []
    for i, entry in enumerate(entries or []):
        key = f"optim.groups[{i}]"
        selector = entry.get("modules")
        if not as_list(selector):
            raise FinetuneError(f"{key}: needs modules: a selector (path, glob or index) naming "
                                "the modules in the group")
        if entry.get("lr") is not None and entry.get("lr_mult") is not None:
            raise FinetuneError(f"{key}: give lr or lr_mult, not both")
        specs.append(GroupSpec(str(entry.get("name") or describe(selector)),
                               select_modules(model, selector, f"{key}.modules"),
                               entry.get("lr"), entry.get("lr_mult"), entry.get("weight_decay")))
    return specs


def layer_units(model: nn.Module) -> list[str]:
    """The layers of `optim.layer_decay`, front to back: the model's children, with every
    Sequential / ModuleList opened into its children, and a block opened when it holds a
    stack of like blocks (ViT's encoder -> encoder.layers.encoder_layer_N). A module's own
    parameters (ViT's class_token, encoder.pos_embedding) form a layer before its children."""
    units: list[str] = []

    def is_stack(module: nn.Module) -> bool:
        kids = list(module.children())
        return (len(kids) >= 2 and all(any(True for _ in k.children()) for k in kids)
                and len({type(k) for k in kids}) == 1)

    def visit(module: nn.Module, path: str) -> None:
        children = list(module.named_children())
        opened = (path == "" or isinstance(module, CONTAINERS)
                  or any(isinstance(c, CONTAINERS) and is_stack(c) for _, c in children))
        if not opened:
            if any(True for _ in module.parameters()):
                units.append(path)
            return
        if any(True for _ in module.parameters(recurse=False)):
            units.append(path)
        for name, child in children:
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return units


def layer_map(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The layers of `optim.layer_decay` front to back, and each parameter's layer. A timm
    model groups its own parameters (`group_matcher`: stem, each block, the head last), as
    timm's param_groups_layer_decay does; any other model uses `layer_units`."""
    grouped = timm_layers(model)
    if grouped is not None:
        return grouped
    units = layer_units(model)
    return units, {name: unit_of(name, units) for name, _ in model.named_parameters()}


def timm_layers(model: nn.Module) -> tuple[list[str], dict[str, str]] | None:
    """timm's own layer grouping, each layer named by the module path its parameters share
    (blocks.3; `stem` for the parameters before the blocks); None without one."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is None or not callable(matcher):
        return None
    try:  # lazy: an optional extra (finetune[timm])
        from timm.models import group_parameters

        groups = group_parameters(model, matcher(coarse=False))
    except Exception:  # a model whose matcher does not fit it after surgery
        return None
    units, mapping = [], {}
    for index in sorted(groups):
        names = groups[index]
        # named by where it starts: the parameters under its first one's top-level module
        # (blocks.5 for [blocks.5.*, norm.*], which timm groups together)
        top = owner(names[0]).split(".")[0]
        owners = [owner(n).split(".") for n in names if owner(n).split(".")[0] == top]
        shared = []
        for parts in zip(*owners, strict=False):
            if len(set(parts)) != 1:
                break
            shared.append(parts[0])
        label = ".".join(shared) or ("stem" if index == 0 else f"layer{index}")
        while label in units:
            label = f"{label}+"
        units.append(label)
        mapping.update(dict.fromkeys(names, label))
    return units, mapping


def unit_of(param: str, units: list[str]) -> str:
    """The layer holding a parameter: the longest unit its module path starts with."""
    holder = owner(param)
    best = ""
    for unit in units:
        if (holder == unit or holder.startswith(f"{unit}.") or unit == "") and \
                len(unit) >= len(best):
            best = unit
    return best


def is_no_decay(model: nn.Module, param: str, tokens: list[str]) -> bool:
    """`bias`: any bias; `norm`: parameters of normalization layers; anything else: a glob
    over parameter names (e.g. `*pos_embedding`, `class_token`)."""
    for token in tokens:
        if token == "bias" and param.rpartition(".")[2] == "bias":
            return True
        if token == "norm" and isinstance(model.get_submodule(owner(param)), NORM_LAYERS):
            return True
        if token not in ("bias", "norm") and fnmatch.fnmatchcase(param, token):
            return True
    return False


@dataclass(frozen=True)
class GroupPlan:
    """One optimizer group as data (parameter names, no tensors): what the plan computes
    once, inspect shows, the optimizer is built from, and a resumed checkpoint must match."""

    name: str
    params: list[str]
    lr: float
    weight_decay: float
    join_epoch: int
    warmup_epochs: int
    stage: int  # the freeze stage it joins at (0 = the start)

    def torch_group(self, named: dict[str, nn.Parameter]) -> dict[str, Any]:
        """The torch.optim param group (with what Schedule reads: base_lr, join_epoch,
        warmup_epochs)."""
        return {"name": self.name, "params": [named[n] for n in self.params], "lr": self.lr,
                "base_lr": self.lr, "weight_decay": self.weight_decay,
                "join_epoch": self.join_epoch, "warmup_epochs": self.warmup_epochs}


def stage_groups(model: nn.Module, cfg: Any, plan: FreezePlan, index: int,
                 specs: list[GroupSpec], taken: set[str], no_decay_more: tuple[str, ...] = ()
                 ) -> list[GroupPlan]:
    """The groups of the parameters that join at stage `index`, named (names in `taken`
    get the stage's epoch appended, and are added to it)."""
    stage: Stage = plan.stages[index]
    units, unit_map = layer_map(model) if cfg.get("layer_decay") else ([], {})
    no_decay = [str(t) for t in cfg.get("no_decay") or []] + list(no_decay_more)
    buckets: dict[tuple[str, str, bool], dict[str, Any]] = {}
    for name in stage.params:
        spec = next((s for s in specs if inside(owner(name), s.modules)), None)
        if spec is not None:
            base = spec.name
            lr = spec.lr if spec.lr is not None else base_lr(cfg) * (spec.lr_mult or 1.0)
            wd = spec.weight_decay if spec.weight_decay is not None else cfg.weight_decay
        else:
            base = stage.name
            lr = (stage.lr if stage.lr is not None else base_lr(cfg) * (stage.lr_mult or 1.0)) \
                if index > 0 else base_lr(cfg)
            wd = cfg.weight_decay
        unit = unit_map[name] if units else ""
        if units:
            lr *= cfg.layer_decay ** (len(units) - 1 - units.index(unit))
        plain = wd > 0 and is_no_decay(model, name, no_decay)
        key = (base, unit, plain)
        if key not in buckets:
            label = "/".join(p for p in (base, unit if unit != base else "",
                                         "no_decay" if plain else "") if p)
            buckets[key] = {"name": label, "params": [], "lr": lr,
                            "weight_decay": 0.0 if plain else wd, "join_epoch": stage.epoch,
                            "warmup_epochs": stage.warmup_epochs if index > 0 else 0,
                            "stage": index}
        buckets[key]["params"].append(name)
    groups = []
    for bucket in buckets.values():
        if bucket["name"] in taken:
            bucket["name"] = f"{bucket['name']}@{stage.epoch}"
        taken.add(bucket["name"])
        groups.append(GroupPlan(**bucket))
    return groups


def plan_groups(model: nn.Module, cfg: Any, plan: FreezePlan,
                first: list[GroupSpec] | None = None, no_decay_more: tuple[str, ...] = ()
                ) -> list[GroupPlan]:
    """The optimizer groups of every stage of `plan`, in join order (the same every time: a
    resumed run rebuilds the groups it saved). `cfg` is the optim group; `first`: groups
    that come before `optim.groups` (an adapter's), `no_decay_more`: globs of parameter
    names without weight decay beside `optim.no_decay`.

    Raises:
        FinetuneError: an optim.groups entry without modules, with lr and lr_mult, or whose
            selector matches nothing.
    """
    specs = [*(first or []), *group_specs(model, cfg.get("groups"))]
    taken: set[str] = set()
    groups: list[GroupPlan] = []
    for index in range(len(plan.stages)):
        groups += stage_groups(model, cfg, plan, index, specs, taken, no_decay_more)
    return groups


def torch_groups(groups: list[GroupPlan], model: nn.Module) -> list[dict[str, Any]]:
    """The torch.optim param groups of `groups`, on `model`'s parameters."""
    named = dict(model.named_parameters())
    return [g.torch_group(named) for g in groups]


def param_groups(model: nn.Module, cfg: Any, plan: FreezePlan, stages: int
                 ) -> list[dict[str, Any]]:
    """torch param groups for every parameter trainable once `stages` stages have begun."""
    return torch_groups([g for g in plan_groups(model, cfg, plan) if g.stage < max(1, stages)],
                        model)


def build_optimizer(model: nn.Module, cfg: Any, plan: FreezePlan | None = None,
                    stages: int = 1) -> torch.optim.Optimizer:
    """`cfg` is the optim group; the groups of the first `stages` stages of `plan` (without a
    plan, everything trains). Frozen parameters are not handed to the optimizer at all."""
    if plan is None:
        plan = plan_freeze(model, None)
    return make_optimizer(cfg, param_groups(model, cfg, plan, stages))


class Schedule(LRScheduler):
    """The learning rate of every group: its own base rate x the schedule's factor at time t
    x the group's warm-up ramp since it joined. Groups carry what it needs (base_lr,
    join_epoch, warmup_epochs), so groups added mid-run are scheduled like the rest, and the
    state (time, plateau factor) lives in state_dict for resume.

    t counts epochs, or optimizer steps for one-cycle (`per_step`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, epochs: int,
                 steps_per_epoch: int = 1, warmup_epochs: int = 0, step_size: int = 10,
                 gamma: float = 0.1, patience: int = 2) -> None:
        self.name, self.epochs, self.warmup = name, max(1, epochs), warmup_epochs
        self.per_step = self.shape.per_step
        self.steps_per_epoch = max(1, steps_per_epoch) if self.per_step else 1
        self.step_size, self.gamma, self.patience = step_size, gamma, patience
        self.plateau_factor, self.best, self.bad_epochs = 1.0, math.inf, 0
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group.setdefault("join_epoch", 0)
            group.setdefault("warmup_epochs", 0)
        super().__init__(optimizer)

    def epoch_time(self, t: int | None = None) -> float:
        return (self.last_epoch if t is None else t) / self.steps_per_epoch

    @property
    def shape(self) -> LRShape:
        """The shape from the table (looked up, not stored: the state dict stays plain data
        that torch.load(weights_only=True) reads)."""
        return SCHEDULES[self.name]

    def factor(self, epoch: float) -> float:
        """The schedule's multiplier at (fractional) epoch `epoch`, before group ramps: the
        linear warm-up, then the shape from finetune/training/schedules.py."""
        if not self.shape.owns_warmup:
            if epoch < self.warmup:
                return ramp(epoch, self.warmup)
            epoch -= self.warmup
        return self.shape.factor(self, epoch)

    def lr_of(self, group: dict[str, Any]) -> float:
        epoch = self.epoch_time()
        since = epoch - group.get("join_epoch", 0)
        warm = group.get("warmup_epochs", 0)
        local = ramp(since, warm) if warm and since < warm else 1.0
        return group["base_lr"] * self.factor(epoch) * local

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.lr_of(group) for group in self.optimizer.param_groups]

    def observe(self, val_loss: float) -> None:
        """Plateau: one validation's loss; after `patience` epochs without improvement the
        factor drops by `gamma`, at once. Called at the end of validation, before the epoch's
        checkpoint is written, so a resumed run has seen every observation (Lightning steps
        its own plateau schedulers after the checkpoint and skips that step on resume)."""
        if not self.shape.observes_loss:
            return
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.plateau_factor *= self.gamma
                self.bad_epochs = 0
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_of(group)
                self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def add_groups(self, groups: list[dict[str, Any]]) -> None:
        """Join groups mid-run, each starting at its scheduled learning rate right away."""
        for group in groups:
            self.optimizer.add_param_group(group)
            added = self.optimizer.param_groups[-1]
            added["initial_lr"] = added["base_lr"]
            added["lr"] = self.lr_of(added)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def ramp(t: float, span: float) -> float:
    """Linear warm-up from WARMUP_START to 1 over `span` epochs."""
    return WARMUP_START + (1.0 - WARMUP_START) * min(1.0, t / span)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, max_epochs: int,
                    total_steps: int) -> dict[str, Any]:
    """A Lightning lr_scheduler config for `cfg` (the sched group). There is always one, even
    for `none`: groups that join later may warm up.

    `sched.epochs` (default: trainer.max_epochs) is the schedule's length, so a run can stop
    early and resume on the same curve."""
    epochs = cfg.get("epochs") or max_epochs
    steps_per_epoch = max(1, total_steps // max(1, max_epochs))
    schedule = Schedule(optimizer, cfg.name, epochs, steps_per_epoch, cfg.warmup_epochs,
                        cfg.step_size, cfg.gamma, cfg.patience)
    return {"scheduler": schedule, "interval": "step" if schedule.per_step else "epoch",
            "name": "lr"}
