"""The plan of a `task: detection` or `task: instance_segmentation` run: the box data (and
each object's mask) read and checked, the detector built once — torchvision's by name, or
any classifier (cut by the surgery) under Faster R-CNN, RetinaNet, FCOS or Mask R-CNN — its
pretrained tensors loaded and reported, the freeze plan and optimizer
groups on the detector's own module paths; every problem found, at once.

A classifier's weights load into the classifier before it becomes the backbone, so a run,
a recipe or a torchvision / timm classification entry is a start exactly as for
classification; in the detector its tensors live under `backbone.body.`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.ops.misc import FrozenBatchNorm2d

from finetune.compose.precheck import config_problems
from finetune.compose.ranges import range_problems
from finetune.data.box_datamodule import build_box_datamodule
from finetune.data.formats import FORMATS
from finetune.errors import FinetuneError
from finetune.models import backbones
from finetune.models.detectors import (
    FROZEN_BN_PRETRAINED,
    DetectorProblem,
    backbone_of,
    build_detector,
    class_layers,
    detector_names,
    detector_on,
    finds_masks,
    freeze_batchnorm,
    unknown_arguments,
)
from finetune.models.sources import BUILDER_LOADS, builder_loads_problem, model_source_of
from finetune.tasks.table import task_of
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.optim import plan_groups
from finetune.training.plan_types import Built, RunPlan
from finetune.training.validate import device_problems, loaded_classifier
from finetune.weights.loading import load_for_plan
from finetune.weights.sources import source_of

DEFAULT_SIZE = 800  # torchvision's detectors resize the shorter side to 800 px
CACHE_REASON = ("off: task={task} (the detector trains on whole images of any size; the "
                "feature cache serves classifiers)")


def input_size(cfg: DictConfig) -> int:
    """The detector's shorter side: data.image_size, else the canvases' side, else 800."""
    if cfg.data.image_size:
        return int(cfg.data.image_size)
    if cfg.data.name == "digit_canvases":
        return int(cfg.data.canvases.size)
    return DEFAULT_SIZE


def detector_kwargs(cfg: DictConfig, size: int, prep: backbones.Preprocessing,
                    by_name: bool) -> dict[str, Any]:
    """What the detector's own transform needs: the sizes (torchvision's 800 / 1333 ratio;
    SSD's are fixed by its name) and the normalization — a classifier's weights', or for a
    detector by name its builder's own (what its COCO weights expect) unless data.mean /
    data.std say otherwise."""
    fixed = by_name and cfg.model.name.startswith("ssd")
    sizes = {} if fixed else {"min_size": size, "max_size": max(size, round(size * 1333 / 800))}
    if by_name:
        return {**sizes, **({"image_mean": list(prep.mean)} if cfg.data.mean else {}),
                **({"image_std": list(prep.std)} if cfg.data.std else {})}
    return {**sizes, "image_mean": list(prep.mean), "image_std": list(prep.std)}


def mask_problems(cfg: DictConfig, by_name: bool) -> list[str]:
    """A detector that does not find what the task asks: masks without a Mask R-CNN, or a
    Mask R-CNN head for boxes alone (a mask branch that would train on nothing)."""
    wants = task_of(cfg).instance_masks
    name, head = cfg.model.name, cfg.model.detector.head
    if by_name and wants and not finds_masks(name):
        masked = ", ".join(n for n in detector_names() if finds_masks(n))
        return [f"model.name={name}: finds no masks; task={cfg.task} trains a Mask R-CNN "
                f"({masked}), or a classifier under model.detector.head=maskrcnn"]
    if not by_name and wants != finds_masks(head):
        if wants:
            return [f"model.detector.head={head}: finds no masks; task={cfg.task} puts the "
                    "classifier under model.detector.head=maskrcnn"]
        return [f"model.detector.head={head}: finds masks, and task={cfg.task} has none to "
                "train it on; use fasterrcnn, retinanet or fcos, or "
                "task=instance_segmentation with masked data"]
    return []


def _config_problems(cfg: DictConfig) -> list[str]:
    problems = config_problems(cfg) + device_problems(cfg.trainer)
    if cfg.adapter.type is not None:
        problems.append(f"adapter.type with task={cfg.task}: adapters are built for "
                        "classifiers so far; fine-tune the detector with freeze.train_from "
                        "instead")
    name, by_name = cfg.model.name, cfg.model.name in detector_names()
    problems += mask_problems(cfg, by_name)
    if by_name:
        loads = sorted(set(cfg.model.kwargs) & set(BUILDER_LOADS))
        problems += [builder_loads_problem(loads[0], "model.kwargs")] if loads else []
        if "trainable_backbone_layers" in cfg.model.kwargs:
            problems.append("model.kwargs.trainable_backbone_layers: torchvision applies it "
                            "only where its builder loads the weights, and finetune loads them "
                            "itself; freeze with freeze.train_from (e.g. backbone.body.layer3)")
        if cfg.model.source != "torchvision":
            problems.append(f"model.name={name} is a torchvision detector; set "
                            "model.source=torchvision")
        if cfg.surgery:
            problems.append(f"surgery: changes a classifier before it becomes a detector's "
                            f"backbone; {name} is a detector already (name a classifier, e.g. "
                            "vgg16 or resnet50, to cut one)")
        if cfg.model.detector.levels:
            problems.append(f"model.detector.levels: names FPN levels of a classifier's maps; "
                            f"{name} has its own backbone and neck")
    else:
        found = model_source_of(cfg).problems(name)
        problems += [f"{p}; task={cfg.task} also takes torchvision's detectors by name "
                     f"({', '.join(detector_names()[:4])}, ...)" for p in found]
        if found:
            return problems
    if source_of(cfg).needs_model:
        problems += source_of(cfg).problems(cfg)
    return problems


def _unknown(model: torch.nn.Module, given: dict[str, Any], name: str | None, where: str,
             problems: list[str]) -> bool:
    """Whether `given` (model.kwargs, model.detector.kwargs) holds arguments the detector
    does not take, each one a problem."""
    unknown = unknown_arguments(model, given, name)
    problems += [f"{where}.{key}: {type(model).__name__} takes no such argument (it would "
                 "be ignored); see its torchvision documentation for the names"
                 for key in unknown]
    return bool(unknown)


def frozen_bn(cfg: DictConfig) -> bool:
    """Whether the detector's backbone gets FrozenBatchNorm2d (model.detector.frozen_bn):
    `auto` does as torchvision's builder does — frozen for its detectors that freeze them
    when given pretrained weights, when this run's weights are pretrained (any source but
    none); a classifier under a detector head keeps its BatchNorm."""
    value = cfg.model.detector.get("frozen_bn", "auto")
    if value == "auto":
        return cfg.model.name in FROZEN_BN_PRETRAINED and cfg.weights.source != "none"
    return bool(value)


def build_model(cfg: DictConfig, class_names: list[str], size: int,
                prep: backbones.Preprocessing, entry: Any, load: bool, train_sources: bool,
                problems: list[str], notes: list[str]) -> Built | None:
    """The detector with its weights loaded (None: `problems` says why). `entry`: the
    weights source's pretrained entry (plan_run's `plan.entry`)."""
    count, channels = len(class_names), cfg.data.channels
    name = cfg.model.name
    sizes = detector_kwargs(cfg, size, prep, name in detector_names())
    user_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    detector_user = OmegaConf.to_container(cfg.model.detector.kwargs, resolve=True)
    assert isinstance(user_kwargs, dict) and isinstance(detector_user, dict)
    # recorded only when on: the run dirs of before rebuild as they were
    frozen = {"frozen_bn": True} if frozen_bn(cfg) else {}
    try:
        if name in detector_names():
            kwargs = {**sizes, **user_kwargs, **frozen}
            model = build_detector(name, count, task_of(cfg).instance_masks, **kwargs)
            if _unknown(model, user_kwargs, name, "model.kwargs", problems):
                return None
            if frozen:
                notes.append(_frozen_note(model, name))
            head_paths = class_layers(model)
            report = load_for_plan(model, cfg.weights, name, head_paths, None, class_names,
                                   load, train_sources, notes)
            return Built(model, kwargs, head_paths, report, [])
        found = loaded_classifier(cfg, entry, size, load, train_sources, problems, notes)
        if found is None:
            return None
        classifier, kwargs, report = found
        levels = list(cfg.model.detector.levels)
        detector_args = {**sizes, **detector_user}
        backbone = backbone_of(classifier, levels or None, size, channels)
        model = detector_on(backbone, cfg.model.detector.head, count, **detector_args)
        if _unknown(model, detector_user, None, "model.detector.kwargs", problems):
            return None
        if frozen:
            freeze_batchnorm(model.backbone)
            notes.append(_frozen_note(model, name))
    except FinetuneError as err:  # the weights: a file, min_loaded, weights.require
        problems.extend(err.problems)
        return None
    except DetectorProblem as err:
        problems.append(f"model.name={name}: {err}")
        return None
    except RuntimeError as err:  # the classifier cannot take `size` px (pooling, a ViT)
        first = str(err).strip().splitlines()[0]
        problems.append(f"{name} cannot give feature maps of {size} px images ({first}); "
                        "raise data.image_size or cut the classifier earlier")
        return None
    return Built(model, {"classifier": kwargs, "detector": cfg.model.detector.head,
                         "levels": levels, **detector_args, **frozen},
                 class_layers(model), report, [])


def _frozen_note(model: torch.nn.Module, name: str) -> str:
    count = sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    return (f"model: the {count} BatchNorm layers of {name}'s backbone are FrozenBatchNorm2d "
            "(statistics and affine fixed: torchvision's choice for its pretrained detectors, "
            "which train on a few images per step); model.detector.frozen_bn=false trains "
            "them")


def dry_run_problem(model: torch.nn.Module, size: int, channels: int, name: str) -> str | None:
    """One image through the detector in eval mode: a model that cannot take the run's
    input size is one sentence now, not a traceback in the first step."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model([torch.zeros(channels, size, size)])
    except (RuntimeError, AssertionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"{name} as a detector cannot take {size} px images ({first}); raise "
                "data.image_size or use FPN levels of larger maps")
    finally:
        model.train(was)
    return None


def plan_detector(plan: RunPlan, load: bool, train_sources: bool) -> RunPlan:
    """Fill `plan` (a detector's run): data, model, weights, freeze and groups."""
    cfg = plan.cfg
    plan.problems += _config_problems(cfg)
    if any(p.startswith(("model.", "weights.")) for p in plan.problems) \
            or range_problems(cfg):
        return plan  # the data is still read when only other keys are wrong: all at once
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    size = input_size(cfg)
    try:
        plan.entry = source_of(cfg).entry(cfg)
        by_name = cfg.model.name in detector_names()
        # a torchvision detector normalizes as its COCO weights did (ImageNet statistics);
        # a classifier as its own weights did
        entry = None if by_name else source_of(cfg).preprocessing_entry(cfg)
        base = backbones.preprocessing(entry, size, cfg.data.mean, cfg.data.std,
                                       cfg.data.channels)
        plan.prep = backbones.Preprocessing(size, size, base.mean, base.std,
                                            channels=cfg.data.channels)
        data_format = FORMATS[cfg.data.name]
        if data_format.holds == "boxes" and not data_format.problems(cfg.data):
            plan.data = build_box_datamodule(cfg.data, cfg.head.num_classes, cfg.seed,
                                             task_of(cfg).instance_masks)
            plan.class_names = plan.data.class_names
            plan.problems += task_of(cfg).monitored_problems(cfg, len(plan.class_names))
    except FinetuneError as err:
        plan.problems += [p for p in err.problems if p not in plan.problems]
    if plan.problems or plan.class_names is None:
        return plan
    built = build_model(cfg, plan.class_names, size, plan.prep, plan.entry, load,
                        train_sources, plan.problems, plan.notes)
    if built is None:
        return plan
    try:
        plan.freeze = plan_freeze(built.model, cfg.freeze.train_from, cfg.freeze.bn,
                                  cfg.freeze.modules, cfg.freeze.unfreeze)
        plan.groups = plan_groups(built.model, cfg.optim, plan.freeze)
    except FinetuneError as err:
        plan.problems += err.problems
        return plan
    problem = dry_run_problem(built.model, size, cfg.data.channels, cfg.model.name)
    if problem:
        plan.problems.append(problem)
        return plan
    plan.built = built
    apply_freeze(built.model, plan.freeze)
    plan.cache_reason = CACHE_REASON.format(task=cfg.task)
    return plan
