"""plan_run: everything a run decides before it trains, computed once, every problem at once.

Training is plan -> fit -> save (finetune/training/run.py); `inspect` renders the plan and
`recipes validate` prints its problems. The model is built once: backbone -> head -> surgery
with every path checked (finetune.validate.assemble_checked), then the weights load into it.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch import nn
from torchvision.models import WeightsEnum

from finetune import plugins
from finetune.compose.precheck import num_classes_problem
from finetune.compose.ranges import (
    BATCH_PLACEHOLDER,
    is_auto_batch,
    planned_batch_size,
    range_problems,
)
from finetune.compose.schema import mix_enabled
from finetune.data.datamodule import build_datamodule, uint8_batches
from finetune.errors import ConfigError, FinetuneError
from finetune.models import adapters, backbones, surgery
from finetune.models.sources import model_source_of
from finetune.tasks.table import task_of
from finetune.training import batch_finder, lr_finder
from finetune.training import feature_cache as cache
from finetune.training.detection_plan import plan_detector
from finetune.training.freezing import FreezePlan, apply_freeze, plan_freeze
from finetune.training.optim import LR_PLACEHOLDER, GroupPlan, GroupSpec, is_auto, plan_groups
from finetune.training.plan_types import Built, RunContext, RunPlan
from finetune.training.segmentation_plan import plan_segmenter
from finetune.training.validate import assemble_checked, single_value_norm_problem, validate
from finetune.weights.loading import load_for_plan
from finetune.weights.sources import source_of


def pretrained_entry(cfg: DictConfig) -> WeightsEnum | dict[str, Any] | None:
    """The pretrained entry a run loads: a torchvision weights entry, a timm pretrained
    config, or None for a source without one."""
    return source_of(cfg).entry(cfg)


def preprocessing_for(cfg: DictConfig) -> backbones.Preprocessing:
    """The eval preprocessing of a run: the weights' own, scaled and overridden by `data`.

    For a file or URL, the architecture's usual weights (a .pth from torchvision expects
    their preprocessing); for random init, a run or a recipe, a plain resize to
    data.image_size with ImageNet statistics (what a run of this framework from scratch uses).
    """
    entry = source_of(cfg).preprocessing_entry(cfg)
    return backbones.preprocessing(entry, cfg.data.image_size, cfg.data.mean, cfg.data.std,
                                   cfg.data.channels, cfg.data.interpolation,
                                   cfg.data.crop_pct)


def check_num_classes(configured: int | None, class_names: list[str]) -> int:
    problem = num_classes_problem(configured, class_names)
    if problem:
        raise FinetuneError(problem)
    return len(class_names)


def cache_decision(cfg: DictConfig, model: nn.Module, freeze: FreezePlan,
                   train_images: int) -> tuple[cache.Cut | None, str]:
    """Whether this run caches the frozen prefix, and why (also what `inspect` shows)."""
    limit, batch = cfg.trainer.limit_train_batches, planned_batch_size(cfg.data.batch_size)
    per_epoch = (min(1.0, float(limit)) if isinstance(limit, float)
                 else min(1.0, int(limit) * batch / max(1, train_images)))
    return cache.decide(cfg.freeze.cache, model, len(freeze.stages) > 1, bool(cfg.data.augment),
                        per_epoch * (cfg.trainer.max_epochs or 1), mix_enabled(cfg.data))


def input_size_problem(cfg: DictConfig, crop: int, build_kwargs: dict[str, Any],
                       err: BaseException) -> str:
    """One sentence for a model that cannot run on the run's input size, saying which size
    or key to use."""
    name = cfg.model.name
    hint = model_source_of(cfg).size_hint(name, build_kwargs, crop)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{name} cannot take {crop} px inputs ({first}); {hint}"


def adapt(cfg: DictConfig, built: Built, adapter: adapters.AdapterPlan
          ) -> tuple[FreezePlan, list[GroupPlan]]:
    """Put the adapters into the loaded model; its freeze plan (the base frozen but for the
    adapters, the head and adapter.train_fully; freeze.unfreeze phases as declared) and its
    optimizer groups (the adapters' own first, at adapter.lr; DoRA's scales without decay)."""
    model = built.model
    built.base_sha256 = adapters.base_sha256(model, adapter)
    adapters.inject(model, adapter)
    built.adapter = adapter
    region, own = adapters.frozen_base(model, adapter)
    freeze = plan_freeze(model, None, cfg.freeze.bn, None, cfg.freeze.unfreeze,
                         frozen_region=region, frozen_own=own)
    start = freeze.stages[0]  # its groups: "adapter" and the modules trained fully
    start.name, start.selector = "fully", f"adapters + {', '.join(adapter.train_fully)}"
    return freeze, optimizer_groups(cfg, model, freeze, adapter)


def optimizer_groups(cfg: DictConfig, model: nn.Module, freeze: FreezePlan,
                     adapter: adapters.AdapterPlan | None) -> list[GroupPlan]:
    """The optimizer groups of a classifier's run at `optim.lr` (again once optim.lr=auto
    is found): with adapters, theirs first (adapter.lr; DoRA's scales without decay)."""
    if adapter is None:
        return plan_groups(model, cfg.optim, freeze)
    group = GroupSpec("adapter", adapters.adapter_modules(model), adapter.lr, None, None)
    return plan_groups(model, cfg.optim, freeze, [group], (adapters.MAGNITUDE,))


def plan_run(cfg: DictConfig, context: RunContext | None = None, *, load: bool = True,
             train_sources: bool = True) -> RunPlan:
    """Validate, read the data, build the model once, load its weights, plan the freeze and
    the feature cache; every problem found on the way is in `plan.problems`.

    Args:
        load: load the weights (False: check the config and paths only, as validate does).
        train_sources: whether a recipe source without a run may be trained now (False:
            the plan notes it and starts from random weights, as inspect does).
    """

    plugins.load()  # a sweep's worker process or finetune.train: the tables it may name
    plan = RunPlan(cfg, context or RunContext())
    plan.problems += lr_finder.lr_problems(cfg, task_of(cfg).model_kind)
    plan.problems += batch_finder.batch_problems(cfg, task_of(cfg).model_kind)
    if is_auto_batch(cfg.data.batch_size):
        plan.batch_auto = True
        plan.notes.append(f"data.batch_size=auto: Lightning's batch-size finder picks the "
                          f"largest batch that fits the device before the run trains; until "
                          f"then the plan uses {BATCH_PLACEHOLDER}")
    if is_auto(cfg.optim.lr):
        plan.lr_auto = True
        plan.notes.append(f"optim.lr=auto: Lightning's learning-rate finder picks the rate "
                          f"before the run trains; until then the groups below use "
                          f"{LR_PLACEHOLDER:g}")
    if task_of(cfg).model_kind == "detector":
        if str(cfg.data.uint8_batches).lower() == "true":
            plan.problems.append(f"data.uint8_batches=true with task={cfg.task}: torchvision's "
                                 "detectors take float images and normalize them inside the "
                                 "model; leave it auto")
        return plan_detector(plan, load, train_sources)
    if task_of(cfg).model_kind == "segmenter":
        return plan_segmenter(plan, load, train_sources)
    try:
        validate(cfg)
    except ConfigError as err:
        plan.problems += err.problems
    if any(p.startswith("model.name") for p in plan.problems) or range_problems(cfg):
        # nothing below can be checked without the model; and a value out of its range
        # (said with every config-level problem) would break the steps that use it
        return plan
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        if not any(p.startswith("weights") for p in plan.problems):
            plan.entry = pretrained_entry(cfg)
        plan.prep = preprocessing_for(cfg)
    except FinetuneError as err:  # e.g. a received folder's config.json
        plan.problems += err.problems
        return plan
    classes_for_checks: list[str] | None = None
    if cfg.head.type != "none":
        if not any(p.startswith(("data.", "data=")) for p in plan.problems):  # (said once)
            try:
                plan.data = build_datamodule(
                    cfg.data, plan.prep, cfg.seed, cfg.task, epochs=cfg.trainer.max_epochs or 1,
                    uint8=uint8_batches(cfg.data.uint8_batches, cfg.trainer.accelerator),
                    decode_now=False)  # a run decides once it knows its feature cache
                check_num_classes(cfg.head.num_classes, plan.data.class_names)
                plan.class_names = plan.data.class_names
                task = task_of(cfg)
                plan.problems += task.monitored_problems(cfg, len(plan.class_names))
                setting = cfg.loss.get(task.loss_weights)
                plan.class_weights = None if setting is None else task.loss_weights_of(
                    setting, plan.data.class_counts(), len(plan.data.train_set),
                    plan.class_names)
            except FinetuneError as err:  # (the class count may be known from precheck)
                plan.problems += [p for p in err.problems if p not in plan.problems]
        # the paths are still checked: against a head of the size asked for (or 2)
        classes_for_checks = plan.class_names or [str(i) for i in range(
            cfg.head.num_classes or 2)]
    checked = assemble_checked(cfg, classes_for_checks, plan.entry, plan.prep.crop,
                               plan.prep.channels)
    plan.problems += checked.problems
    if plan.problems or checked.assembled is None or checked.freeze is None:
        if load and not any(p.startswith("weights") for p in plan.problems):
            # the weights will not load either: say so now, with the rest (when nothing
            # else is wrong, loading says it, naming the file and where to put it)
            unreachable = source_of(cfg).unreachable(cfg)
            plan.problems += [unreachable] if unreachable else []
        return plan
    parts = checked.assembled
    model = parts.model
    build_kwargs = checked.build_kwargs
    try:
        report = load_for_plan(model, cfg.weights, cfg.model.name, parts.head_paths,
                               parts.operated.map_key, plan.class_names, load, train_sources,
                               plan.notes)
    except FinetuneError as err:
        plan.problems += err.problems
        return plan
    try:
        output = surgery.io_shapes(model, plan.prep.crop, paths=[], channels=plan.prep.channels)
    except (RuntimeError, AssertionError) as err:  # torchvision's ViT asserts its input size
        plan.problems.append(input_size_problem(cfg, plan.prep.crop, build_kwargs, err))
        return plan
    plan.built = Built(model, build_kwargs, parts.head_paths, report, list(output[""][1][1:]))
    outputs = plan.built.output_shape
    if plan.class_names is not None and outputs != [len(plan.class_names)]:
        plan.problems.append(
            f"the model gives {outputs} outputs per image but the data has "
            f"{len(plan.class_names)} classes: a surgery op replaced the classifier with "
            "another size; give it out_features: "
            f"{len(plan.class_names)} (or leave the classifier to head.num_classes)")
        return plan
    plan.freeze, plan.groups = checked.freeze, checked.groups
    if checked.adapter is not None:
        try:
            plan.freeze, plan.groups = adapt(cfg, plan.built, checked.adapter)
        except FinetuneError as err:
            plan.problems += err.problems
            return plan
    apply_freeze(model, plan.freeze)
    problem = single_value_norm_problem(model, plan.freeze.eval_modules,
                                        planned_batch_size(cfg.data.batch_size),
                                        plan.prep.crop, plan.prep.channels)
    if problem:
        plan.problems.append(problem)
        return plan
    if plan.data is not None:
        plan.cache_cut, plan.cache_reason = cache_decision(cfg, model, plan.freeze,
                                                           len(plan.data.train_set))
    return plan
