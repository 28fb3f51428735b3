"""Using a run dir: load its model, classify images, write the predictions.

A run dir alone (manifest.json + model.safetensors) is enough: the architecture is rebuilt
from the manifest, the weights loaded strictly, the run's own eval preprocessing applied, and
inference runs under torch.inference_mode() in batches. The CLI is finetune/commands/predict.py; the
API is finetune.load / finetune.predict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from finetune import plugins
from finetune.data.box_datasets import image_tensor
from finetune.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageProblem, open_rgb
from finetune.data.transforms import TTA, eval_transform, tta_transform
from finetune.errors import FinetuneError
from finetune.models.backbones import Preprocessing
from finetune.models.builder import assemble
from finetune.models.detectors import (
    backbone_of,
    build_detector,
    detector_names,
    detector_on,
    freeze_batchnorm,
)
from finetune.models.segmenters import build_segmenter, segmenter_names, segmenter_on
from finetune.rundir import artifacts
from finetune.rundir.manifest import Manifest, read_manifest
from finetune.tasks.table import DEFAULT as DEFAULT_TASK
from finetune.tasks.table import task_of


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """The fine-tuned model of a run dir, in eval mode, with `class_names`, `preprocessing`,
    `manifest` and (a classifier's) `transform`, the eval preprocessing, attached; a
    detector takes `detector_input`'s tensors."""
    plugins.load()  # a run dir may name an installed extension (a model source)
    manifest, weights_file = read_manifest(run_dir)
    task = task_of(getattr(manifest, "task", DEFAULT_TASK))
    prep = Preprocessing(**manifest.preprocessing)
    try:
        model = (recorded_detector(manifest, prep) if task.model_kind == "detector"
                 else recorded_segmenter(manifest, prep) if task.model_kind == "segmenter"
                 else recorded_classifier(manifest, prep))
    except FinetuneError:
        raise
    except Exception as err:  # values the gate lets through that the builders refuse
        raise FinetuneError(f"run={run_dir}: the model its manifest describes cannot be built "
                            f"({_first_line(err)}); the manifest was changed after the run"
                            ) from None
    try:
        result = model.load_state_dict(load_file(str(weights_file)), strict=False)
    except RuntimeError as err:  # shapes that differ (strict=False still refuses those)
        raise FinetuneError(f"run={run_dir}: its weights do not fit the architecture its "
                            f"manifest describes ({_first_line(err)})") from None
    if result.missing_keys or result.unexpected_keys:
        raise FinetuneError(f"run={run_dir}: its weights do not fit the architecture its "
                            f"manifest describes (missing {result.missing_keys[:3]}, unexpected "
                            f"{result.unexpected_keys[:3]})")
    model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Plain attributes, not submodules: the state dict and exports stay the model alone.
    # (a detector's own `transform` is its resizing and normalizing submodule: kept; its
    # input is detector_input's)
    attached = [("class_names", manifest.class_names), ("preprocessing", prep),
                ("manifest", manifest)]
    if task.model_kind == "classifier":
        attached.append(("transform", eval_transform(prep)))
    for name, value in attached:
        object.__setattr__(model, name, value)
    return model


def recorded_classifier(manifest: Manifest, prep: Preprocessing) -> nn.Module:
    """The classifier (or feature extractor) a manifest describes, random weights."""
    head = manifest.head
    return assemble(manifest.model_name, manifest.build_kwargs,
                    None if head.get("type") == "none" else head["num_classes"],
                    head["dropout"], head["hidden"], manifest.surgery, prep.crop,
                    prep.channels, source=manifest.model_source).model


def recorded_detector(manifest: Manifest, prep: Preprocessing) -> nn.Module:
    """The detector a manifest describes, random weights: torchvision's by name, or the
    classifier, cut by the recorded surgery, under the recorded detector (the plan's
    build_model records both; finetune/training/detection_plan.py)."""
    kwargs, count = dict(manifest.build_kwargs), len(manifest.class_names or [])
    if manifest.model_name in detector_names():
        return build_detector(manifest.model_name, count,
                              task_of(manifest.task).instance_masks, **kwargs)
    classifier, head = kwargs.pop("classifier", {}), kwargs.pop("detector", "fasterrcnn")
    levels, frozen = kwargs.pop("levels", []), kwargs.pop("frozen_bn", False)
    parts = assemble(manifest.model_name, classifier, None, 0.0, [], manifest.surgery,
                     prep.crop, prep.channels, source=manifest.model_source)
    backbone = backbone_of(parts.model, list(levels) or None, prep.crop, prep.channels)
    model = detector_on(backbone, head, count, **kwargs)
    if frozen:
        freeze_batchnorm(model.backbone)
    return model


def recorded_segmenter(manifest: Manifest, prep: Preprocessing) -> nn.Module:
    """The segmentation model a manifest describes, random weights: torchvision's by name,
    or the classifier, cut by the recorded surgery, under the recorded head at the recorded
    node (finetune/training/segmentation_plan.py records both)."""
    kwargs, count = dict(manifest.build_kwargs), len(manifest.class_names or [])
    if manifest.model_name in segmenter_names():
        return build_segmenter(manifest.model_name, count, **kwargs)
    parts = assemble(manifest.model_name, kwargs.get("classifier", {}), None, 0.0, [],
                     manifest.surgery, prep.crop, prep.channels, source=manifest.model_source)
    return segmenter_on(parts.model, str(kwargs.get("segmenter", "deeplabv3")),
                        str(kwargs.get("node", "auto")), count, prep.crop, prep.channels)


def detector_input(image: Image.Image) -> torch.Tensor:
    """A detector's input: the image's RGB pixels as floats in [0, 1], at its own size (the
    detector resizes and normalizes), as in training (finetune/data/box_datasets.py)."""
    return image_tensor(np.asarray(image.convert("RGB"))).float().div(255)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])[:200] or type(err).__name__


def list_images(path: str | Path) -> list[Path]:
    """A file, or every image below a folder (sorted)."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FinetuneError(f"input={path}: no such file or folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FinetuneError(f"input={path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
                            "it")
    return files


class Augmented(nn.Module):
    """Test-time augmentation around a model: each image's logits averaged over its views —
    the five crops (an input of shape (B, 5, C, H, W), from `tta_transform`) and, with
    `flip`, each view mirrored left-right. Logits, not probabilities, are averaged: a
    calibrated temperature divides them as it divides one view's."""

    def __init__(self, model: nn.Module, flip: bool) -> None:
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = x if x.dim() == 5 else x.unsqueeze(1)
        if self.flip:
            views = torch.cat([views, views.flip(-1)], dim=1)
        out = self.model(views.flatten(0, 1))
        out = out[0] if isinstance(out, tuple | list) else out
        return out.view(views.shape[0], views.shape[1], -1).mean(1)


def with_tta(model: nn.Module, tta: str) -> tuple[nn.Module, Any]:
    """The model and the transform to classify with under `tta` (one of TTA)."""
    if tta not in TTA:
        raise FinetuneError(f"tta={tta!r} is not one of {', '.join(TTA)}")
    if tta == "none":
        return model, model.transform
    return Augmented(model, "flip" in tta).eval(), tta_transform(model.preprocessing, tta)


@dataclass
class Predictions:
    """Top-k classes per readable image, and the images that could not be read."""

    classes: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)  # path, labels, probs
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # path, reason
    # the run's task: it decides the rows (top-k classes; or a label set and a probability
    # per label, in class order) and the CSV predict writes
    task: str = DEFAULT_TASK


def max_pixels_of(model: nn.Module) -> int:
    """The image size limit the run trained with (data.max_image_pixels), at most Pillow's
    default: a run dir may come from someone else, and may lower the guard against
    decompression bombs but not lift it (a higher limit is the user's: max_pixels=N)."""
    manifest = getattr(model, "manifest", None)
    data = (manifest.config.get("data") if manifest is not None else None) or {}
    value = data.get("max_image_pixels") if isinstance(data, dict) else None
    return min(value, DEFAULT_MAX_PIXELS) if isinstance(value, int) and not isinstance(
        value, bool) and value >= 1 else DEFAULT_MAX_PIXELS


def read_batches(paths: list[Path], transform: Callable[[Image.Image], torch.Tensor],
                 batch_size: int, max_pixels: int, unreadable: list[tuple[str, str]]
                 ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """The images of `paths` read as RGB, transformed and grouped `batch_size` at a time
    (with their paths); an image that cannot be read (or is over `max_pixels`) is added to
    `unreadable` with the reason and skipped."""
    batch: list[torch.Tensor] = []
    names: list[str] = []
    for path in paths:
        try:
            batch.append(transform(open_rgb(path, max_pixels)))
        except ImageProblem as err:
            unreadable.append((str(path), str(err)))
            continue
        names.append(str(path))
        if len(batch) == batch_size:
            yield names, batch
            batch, names = [], []
    if batch:
        yield names, batch


def predict_images(model: nn.Module, paths: list[Path], topk: int = 3, batch_size: int = 64,
                   max_pixels: int | None = None, tta: str = "none") -> Predictions:
    """Classify `paths` with a model from `load_run`; unreadable images (and those over
    `max_pixels`, by default the run's data.max_image_pixels) are skipped and listed. `tta`:
    none, flip, crops or flip+crops (test-time augmentation: the views' logits averaged)."""
    if not getattr(model, "class_names", None):
        raise FinetuneError("this run is a feature extractor (head: none): it has no classes "
                            "to predict; use finetune.load(run_dir) for its features")
    manifest = getattr(model, "manifest", None)
    out = Predictions(list(model.class_names), task=getattr(manifest, "task", DEFAULT_TASK))
    task = task_of(out.task)
    device = next(model.parameters()).device
    net, transform = with_tta(model, tta)
    for names, batch in read_batches(paths, transform, batch_size,
                                     max_pixels or max_pixels_of(model), out.unreadable):
        with torch.inference_mode():
            logits = net(torch.stack(batch).to(device))
            rows = task.predict(logits.cpu(), out.classes, topk, manifest)
        out.rows += [{"path": path, **row} for path, row in zip(names, rows, strict=True)]
    return out


def write_predictions(predictions: Predictions, path: Path) -> None:
    """predictions.csv in the task's columns (top-k labels and probabilities; or the label
    set and a probability per label)."""
    header, rows = task_of(predictions.task).prediction_table(predictions.rows,
                                                              predictions.classes)
    artifacts.write_csv(path, header, rows)
