"""The plan of a `task: segmentation` run: the masks read and checked, the model built once —
torchvision's DeepLabv3 / FCN / LR-ASPP by name, or any classifier (cut by the surgery, or at
model.segmenter.node) under a DeepLabv3 or FCN head — its pretrained tensors loaded and
reported, the new pixel classifier drawn from its own stream, the freeze plan and optimizer
groups on the model's own paths (`backbone.layer4`, `classifier`); every problem at once.

A classifier's weights load into the classifier before it becomes the encoder, so a run, a
recipe or a torchvision / timm classification entry is a start exactly as for
classification; in the segmentation model its tensors live under `backbone.`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from finetune.compose.precheck import config_problems
from finetune.compose.ranges import planned_batch_size, range_problems
from finetune.data.formats import FORMATS
from finetune.data.mask_datamodule import build_mask_datamodule, input_size
from finetune.errors import FinetuneError
from finetune.models import backbones
from finetune.models.detectors import unknown_arguments
from finetune.models.heads import seed_heads
from finetune.models.segmenters import (
    SegmenterProblem,
    build_segmenter,
    class_layers,
    segmenter_names,
    segmenter_on,
)
from finetune.models.sources import BUILDER_LOADS, builder_loads_problem, model_source_of
from finetune.tasks.table import task_of
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.optim import plan_groups
from finetune.training.plan_types import Built, RunPlan
from finetune.training.validate import (
    device_problems,
    loaded_classifier,
    single_value_norm_problem,
)
from finetune.weights.loading import load_for_plan
from finetune.weights.sources import source_of

CACHE_REASON = ("off: task=segmentation (the model's head reads whole feature maps, and its "
                "augmentations move the masks; the feature cache serves classifiers)")


def _config_problems(cfg: DictConfig) -> list[str]:
    problems = config_problems(cfg) + device_problems(cfg.trainer)
    name = cfg.model.name
    if name in segmenter_names():
        loads = sorted(set(cfg.model.kwargs) & set(BUILDER_LOADS))
        problems += [builder_loads_problem(loads[0], "model.kwargs")] if loads else []
        if cfg.model.source != "torchvision":
            problems.append(f"model.name={name} is a torchvision segmentation model; set "
                            "model.source=torchvision")
        if cfg.surgery:
            problems.append(f"surgery: changes a classifier before it becomes an encoder; "
                            f"{name} is a segmentation model already (name a classifier, e.g. "
                            "resnet50, to cut one)")
    else:
        found = model_source_of(cfg).problems(name)
        problems += [f"{p}; task=segmentation also takes torchvision's segmentation models "
                     f"by name ({', '.join(segmenter_names()[:3])}, ...)" for p in found]
        if found:
            return problems
    if source_of(cfg).needs_model:
        problems += source_of(cfg).problems(cfg)
    return problems


def build_model(cfg: DictConfig, class_names: list[str], size: int, entry: Any, load: bool,
                train_sources: bool, problems: list[str], notes: list[str]) -> Built | None:
    """The segmentation model with its weights loaded (None: `problems` says why)."""
    count, channels, name = len(class_names), cfg.data.channels, cfg.model.name
    user_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    assert isinstance(user_kwargs, dict)
    try:
        if name in segmenter_names():
            try:
                model = build_segmenter(name, count, **user_kwargs)
            except TypeError as err:
                problems.append(f"model.kwargs: {name} does not take them ({err})")
                return None
            unknown = unknown_arguments(model, user_kwargs, name)
            if unknown:  # its builder takes **kwargs and drops what it does not know
                problems += [f"model.kwargs.{key}: {name} takes no such argument (it would be "
                             "ignored); see its torchvision documentation for the names"
                             for key in unknown]
                return None
            head_paths = class_layers(model)
            report = load_for_plan(model, cfg.weights, name, head_paths, None, class_names,
                                   load, train_sources, notes)
            seed_heads(model, head_paths, cfg.seed, class_names)
            return Built(model, user_kwargs, head_paths, report, [count, size, size])
        found = loaded_classifier(cfg, entry, size, load, train_sources, problems, notes)
        if found is None:
            return None
        classifier, kwargs, report = found
        head, node = cfg.model.segmenter.head, cfg.model.segmenter.node
        model = segmenter_on(classifier, head, node, count, size, channels)
        seed_heads(model, ["classifier"], cfg.seed, class_names)
    except FinetuneError as err:  # the weights: a file, min_loaded, weights.require
        problems.extend(err.problems)
        return None
    except SegmenterProblem as err:
        problems.append(f"model.name={name}: {err}")
        return None
    except RuntimeError as err:  # the classifier cannot take `size` px
        first = str(err).strip().splitlines()[0]
        problems.append(f"{name} cannot give a feature map of {size} px images ({first}); "
                        "raise data.image_size or cut the classifier earlier")
        return None
    return Built(model, {"classifier": kwargs, "segmenter": head,
                         "node": next(iter(model.backbone.return_layers))},
                 ["classifier"], report, [count, size, size])


def dry_run_problem(model: torch.nn.Module, size: int, channels: int, count: int,
                    name: str) -> str | None:
    """Two images through the model in eval mode: one that cannot take the run's input size,
    or gives maps of another size, is one sentence now."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, channels, size, size))["out"]
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"{name} as a segmentation model cannot take {size} px images ({first}); "
                "raise data.image_size")
    finally:
        model.train(was)
    if tuple(out.shape[1:]) != (count, size, size):
        return (f"{name} gives maps of {list(out.shape[1:])} for {size} px images, not "
                f"{[count, size, size]}")
    return None


def plan_segmenter(plan: RunPlan, load: bool, train_sources: bool) -> RunPlan:
    """Fill `plan` (a task=segmentation run's): data, model, weights, freeze and groups."""
    cfg = plan.cfg
    plan.problems += _config_problems(cfg)
    if any(p.startswith(("model.", "weights.")) for p in plan.problems) \
            or range_problems(cfg):
        return plan  # the data is still read when only other keys are wrong: all at once
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    size = input_size(cfg.data)
    try:
        plan.entry = source_of(cfg).entry(cfg)
        by_name = cfg.model.name in segmenter_names()
        # torchvision's segmentation weights expect ImageNet's statistics (their builders'
        # transforms); a classifier's, its own
        entry = None if by_name else source_of(cfg).preprocessing_entry(cfg)
        base = backbones.preprocessing(entry, size, cfg.data.mean, cfg.data.std,
                                       cfg.data.channels)
        plan.prep = backbones.Preprocessing(size, size, base.mean, base.std,
                                            channels=cfg.data.channels)
        data_format = FORMATS[cfg.data.name]
        if data_format.holds == "masks" and not data_format.problems(cfg.data):
            plan.data = build_mask_datamodule(cfg.data, plan.prep, cfg.head.num_classes,
                                              cfg.seed)
            plan.class_names = plan.data.class_names
            plan.problems += task_of(cfg).monitored_problems(cfg, len(plan.class_names))
    except FinetuneError as err:
        plan.problems += [p for p in err.problems if p not in plan.problems]
    if plan.problems or plan.class_names is None:
        return plan
    built = build_model(cfg, plan.class_names, size, plan.entry, load, train_sources,
                        plan.problems, plan.notes)
    if built is None:
        return plan
    try:
        plan.freeze = plan_freeze(built.model, cfg.freeze.train_from, cfg.freeze.bn,
                                  cfg.freeze.modules, cfg.freeze.unfreeze)
        plan.groups = plan_groups(built.model, cfg.optim, plan.freeze)
    except FinetuneError as err:
        plan.problems += err.problems
        return plan
    problem = dry_run_problem(built.model, size, cfg.data.channels, len(plan.class_names),
                              cfg.model.name)
    if problem:
        plan.problems.append(problem)
        return plan
    plan.built = built
    apply_freeze(built.model, plan.freeze)
    problem = single_value_norm_problem(built.model, plan.freeze.eval_modules,
                                        planned_batch_size(cfg.data.batch_size), size,
                                        cfg.data.channels)
    if problem:
        plan.problems.append(problem)
        return plan
    plan.cache_reason = CACHE_REASON
    return plan
