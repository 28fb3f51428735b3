"""Checks before anything trains, each problem one line, all of them reported together."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune.compose.precheck import config_problems
from finetune.errors import ConfigError, FinetuneError
from finetune.models import adapters, surgery
from finetune.models.builder import Assembled, assemble
from finetune.models.heads import seed_heads
from finetune.models.sources import model_source_of
from finetune.training import feature_cache as cache
from finetune.training.freezing import FreezePlan, plan_freeze
from finetune.training.optim import GroupPlan, plan_groups
from finetune.weights.loading import load_for_plan
from finetune.weights.sources import source_of


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
    problems += model_source_of(cfg).problems(cfg.model.name)
    if not problems and source_of(cfg).needs_model:  # its entry is looked up by model name
        problems += source_of(cfg).problems(cfg)
    problems += config_problems(cfg)
    problems += device_problems(cfg.trainer)
    attempt(lambda: cache.mode_of(cfg.freeze.cache))
    problems += cache.config_conflicts(cfg.freeze.cache, list(cfg.data.augment),
                                       list(cfg.freeze.unfreeze), cfg.freeze.train_from,
                                       list(cfg.freeze.modules),
                                       cfg.adapter.type is not None)
    problems += adapters.config_conflicts(cfg)
    if problems:
        raise ConfigError(problems)


def device_problems(trainer: Any) -> list[str]:
    """A GPU asked for where this torch sees none: one sentence, not Lightning's traceback."""

    accelerator = str(trainer.accelerator).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = (f"this torch {torch.__version__} is built without CUDA"
                 if torch.version.cuda is None else "no CUDA GPU is visible")
        return [f"trainer.accelerator={trainer.accelerator}: {build}; use "
                "trainer.accelerator=auto (a GPU when there is one, else the CPU) or cpu, with "
                "trainer.precision=32-true or bf16-mixed on a CPU"]
    if accelerator == "mps" and not torch.backends.mps.is_available():
        return ["trainer.accelerator=mps: Apple's MPS is not available on this machine; use "
                "trainer.accelerator=auto or cpu"]
    return []


@dataclass
class Checked:
    """The model assembled once (backbone -> head -> surgery, no weights yet) and the freeze
    plan on it; `problems` lists every path that matches nothing (then the model is unusable)."""

    assembled: Assembled | None
    freeze: FreezePlan | None
    problems: list[str]
    build_kwargs: dict[str, Any]
    groups: list[GroupPlan] = field(default_factory=list)
    adapter: adapters.AdapterPlan | None = None  # adapter.type: which layers get one


def assemble_checked(cfg: DictConfig, class_names: list[str] | None, entry: Any,
                     input_size: int, channels: int = 3) -> Checked:
    """builder.assemble (backbone -> head -> surgery, every op checked) with the config's
    builder arguments, then the freeze plan, optimizer groups and weights.require on the
    result, every problem collected; with none the model is ready for its weights."""
    problems, attempt = _collector()
    user_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    assert isinstance(user_kwargs, dict)
    kwargs = {**model_source_of(cfg).pretrained_kwargs(cfg.model.name, entry, input_size,
                                                        channels), **user_kwargs}
    ops = OmegaConf.to_container(cfg.surgery, resolve=True)
    assert isinstance(ops, list)
    assembled = assemble(cfg.model.name, kwargs, len(class_names) if class_names is not None
                         else None, cfg.head.dropout, list(cfg.head.hidden), ops, input_size,
                         channels, problems, model_source_of(cfg).name)
    if assembled is None:
        return Checked(None, None, problems, kwargs)
    model = assembled.model
    if class_names is not None:
        seed_heads(model, assembled.head_paths, cfg.seed, class_names)
    # with an adapter, the freeze plan is made once the adapters are in (training/plan.py)
    plain = cfg.adapter.type is None
    plan = attempt(lambda: plan_freeze(model, cfg.freeze.train_from, cfg.freeze.bn,
                                       cfg.freeze.modules, cfg.freeze.unfreeze if plain
                                       else ()))
    groups = attempt(lambda: plan_groups(model, cfg.optim, plan)) if plan else None
    adapter = attempt(lambda: adapters.plan_adapter(model, cfg.adapter, assembled.head_paths))
    keys = list(model.state_dict())
    for pattern in cfg.weights.require:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in keys):
            problems.append(f"weights.require: {pattern!r} matches no model tensor; keys look "
                            f"like {keys[0]!r}")
    return Checked(assembled if not problems else None, plan, problems, kwargs, groups or [],
                   adapter)


def single_value_norm_problem(model: nn.Module, fixed: list[str], batch_size: int, crop: int,
                              channels: int) -> str | None:
    """A batch of one image where a BatchNorm that trains sees one value per channel (a 1x1
    map at this input size, or after a Linear layer): it cannot compute a variance, and
    the first step would stop with a traceback."""
    if batch_size != 1:
        return None
    norms = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in fixed]
    if not norms:
        return None
    shapes = surgery.io_shapes(model, crop, norms, channels)
    single = [n for n in norms if n in shapes and math.prod(shapes[n][0][2:]) == 1]
    if not single:
        return None
    more = f" (and {len(single) - 1} more)" if len(single) > 1 else ""
    return (f"data.batch_size=1: the BatchNorm layer {single[0]}{more} trains on one value per "
            f"channel at {crop} px, which it cannot do with one image per batch; use "
            "data.batch_size >= 2, or freeze those layers (frozen BatchNorm keeps its "
            "statistics)")


def loaded_classifier(cfg: DictConfig, entry: Any, size: int, load: bool, train_sources: bool,
                      problems: list[str], notes: list[str]
                      ) -> tuple[nn.Module, dict[str, Any], Any] | None:
    """The classifier a detector or segmentation model is built on: assembled without a head,
    cut by the surgery, its pretrained tensors loaded by its own names (its classifier, if not
    cut, unused); (model, builder arguments, load report), or None (`problems` says why).
    Raises FinetuneError for the weights (a file, min_loaded, weights.require)."""
    name, channels = cfg.model.name, cfg.data.channels
    ops = OmegaConf.to_container(cfg.surgery, resolve=True)
    user_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    assert isinstance(ops, list) and isinstance(user_kwargs, dict)
    kwargs = {**model_source_of(cfg).pretrained_kwargs(name, entry, size, channels),
              **user_kwargs}
    start = len(problems)
    parts = assemble(name, kwargs, None, 0.0, [], ops, size, channels, problems,
                     model_source_of(cfg).name)
    if parts is None or len(problems) > start:
        return None
    report = load_for_plan(parts.model, cfg.weights, name, [], parts.operated.map_key, None,
                           load, train_sources, notes)
    return parts.model, kwargs, report
