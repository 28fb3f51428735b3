"""Checks before anything trains, each problem one line, all of them reported together."""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchvision.models import WeightsEnum

from finetune import backbones, cache, heads, surgery
from finetune.builder import Assembled
from finetune.data_formats import FORMATS
from finetune.errors import ConfigError, FinetuneError
from finetune.freezing import FreezePlan, plan_freeze
from finetune.loggers import LOGGERS
from finetune.optim import GroupPlan, plan_groups
from finetune.weight_sources import source_of

BATCH_MIXES = ("MixUp", "CutMix")  # torchvision v2 batch transforms, not per-image ones


def _collector() -> tuple[list[str], Callable[[Callable[[], Any]], Any]]:
    problems: list[str] = []

    def attempt(check: Callable[[], Any]) -> Any:
        try:
            return check()
        except FinetuneError as err:
            problems.extend(err.problems)
            return None

    return problems, attempt


def validate(cfg: DictConfig) -> None:
    """Config-level problems: names, sources, paths on disk. Nothing is built."""
    problems, attempt = _collector()
    attempt(lambda: backbones.check_name(cfg.model.name))
    source = source_of(cfg)
    if not problems or not source.needs_model:
        problems += source.problems(cfg)
    problems += FORMATS[cfg.data.name].problems(cfg.data)
    epochs = cfg.sched.epochs or cfg.trainer.max_epochs
    for i, phase in enumerate(cfg.freeze.unfreeze):
        if phase.epoch >= epochs:
            problems.append(f"freeze.unfreeze[{i}]: epoch {phase.epoch} is never reached (the "
                            f"run has {epochs} epochs, 0..{epochs - 1}); lower it or raise "
                            "trainer.max_epochs")
    if cfg.optim.layer_decay is not None and not 0 < cfg.optim.layer_decay <= 1:
        problems.append(f"optim.layer_decay={cfg.optim.layer_decay}: use a factor in (0, 1], "
                        "e.g. 0.75")
    if cfg.optim.nesterov and (cfg.optim.name != "sgd" or cfg.optim.momentum <= 0):
        problems.append("optim.nesterov=true needs optim.name=sgd with optim.momentum > 0")
    if cfg.sched.epochs is not None and cfg.sched.epochs < 1:
        problems.append(f"sched.epochs={cfg.sched.epochs}: use a number of epochs >= 1, or null "
                        "for trainer.max_epochs")
    if cfg.head.num_classes is not None and cfg.head.num_classes < 1:
        problems.append(f"head.num_classes={cfg.head.num_classes}: must be >= 1")
    package = LOGGERS[cfg.logger.name].package
    if package and importlib.util.find_spec(package) is None:
        problems.append(f"logger={cfg.logger.name} needs the {package} package: "
                        f"pip install 'finetune[{cfg.logger.name}]'")
    for i, entry in enumerate(cfg.data.augment):
        name = entry if isinstance(entry, str) else OmegaConf.select(entry, "type")
        if name in BATCH_MIXES:
            problems.append(f"data.augment[{i}]: {name} mixes pairs of images and their labels "
                            "across a batch, which a per-image augmentation cannot do; it is not "
                            "supported yet (a batch-mix option is planned): remove it")
    attempt(lambda: cache.mode_of(cfg.freeze.cache))
    problems += cache.config_conflicts(cfg.freeze.cache, list(cfg.data.augment),
                                       list(cfg.freeze.unfreeze), cfg.freeze.train_from,
                                       list(cfg.freeze.modules))
    if problems:
        raise ConfigError(problems)


@dataclass
class Checked:
    """The model assembled once (backbone -> head -> surgery, no weights yet) and the freeze
    plan on it; `problems` lists every path that matches nothing (then the model is unusable)."""

    assembled: Assembled | None
    freeze: FreezePlan | None
    problems: list[str]
    build_kwargs: dict[str, Any]
    groups: list[GroupPlan] = field(default_factory=list)


def assemble_checked(cfg: DictConfig, class_names: list[str] | None, entry: WeightsEnum | None,
                     input_size: int, channels: int = 3) -> Checked:
    """backbone -> head -> surgery, each op checked (a path that matches nothing is reported
    and later ops still checked), then the freeze plan, optimizer groups and weights.require
    on the result. With no problems the model is exactly what builder.assemble makes (same
    random initialization), ready for its weights."""
    problems, attempt = _collector()
    user_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    assert isinstance(user_kwargs, dict)
    kwargs = {**(backbones.pretrained_kwargs(cfg.model.name, entry) if entry else {}),
              **user_kwargs}
    model = attempt(lambda: backbones.build(cfg.model.name, kwargs))
    if model is None:
        return Checked(None, None, problems, kwargs)
    head_paths: list[str] = []
    if class_names is not None:
        head_paths = attempt(lambda: heads.replace_heads(
            model, len(class_names), cfg.head.dropout, list(cfg.head.hidden))) or []
    result = surgery.SurgeryResult(model)
    ops = OmegaConf.to_container(cfg.surgery, resolve=True)
    assert isinstance(ops, list)
    for index, op in enumerate(ops):
        before = len(problems)
        if not isinstance(op, dict):
            problems.append(f"surgery[{index}]: an op is a mapping like {{op: remove, path: "
                            f"avgpool}}, got {op!r}")
            continue
        path = str(op.get("path", ""))
        if not (op.get("op") == "truncate" and path == ""):
            attempt(lambda p=path, i=index: surgery.get_module(result.model, p,
                                                                key=f"surgery[{i}].path"))
        if len(problems) > before:
            continue  # a path that matches nothing changed nothing: later ops still check
        attempt(lambda o=op, i=index: surgery.apply_op(result, o, (input_size, channels), i))
        if len(problems) == before:  # as apply_surgery: a dry forward after each op
            attempt(lambda o=op, i=index: surgery.dry_shapes(
                result.model, (input_size, channels),
                f"surgery[{i}] ({o.get('op')} {o.get('path')})"))
        if len(problems) > before and op.get("op") != "replace":
            break  # the model's shape after this op is unknown; later paths depend on it
    plan = attempt(lambda: plan_freeze(result.model, cfg.freeze.train_from, cfg.freeze.bn,
                                       cfg.freeze.modules, cfg.freeze.unfreeze))
    groups = attempt(lambda: plan_groups(result.model, cfg.optim, plan)) if plan else None
    keys = list(result.model.state_dict())
    for pattern in cfg.weights.require:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in keys):
            problems.append(f"weights.require: {pattern!r} matches no model tensor; keys look "
                            f"like {keys[0]!r}")
    assembled = Assembled(result.model, [result.map_key(p) for p in head_paths], result)
    return Checked(assembled if not problems else None, plan, problems, kwargs, groups or [])
