"""A detector fitted by the real Lightning Trainer on digit canvases: list batches through
torchvision.transforms.v2 (boxes flipped with the pixels), the detector's losses logged,
COCO mAP measured on validation (faster-coco-eval), the frozen backbone untouched."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from finetune.compose.schema import OptimConfig, SchedConfig
from finetune.data.box_datasets import (
    BoxDataset,
    box_transform,
    canvas_items,
    collate_boxes,
)
from finetune.data.canvases import digit_canvases
from finetune.models.detectors import LABEL_OFFSET, backbone_of, detector_on
from finetune.tasks.detection import MAP_METRICS, Detection
from finetune.training.detection_module import DetectorModule
from finetune.training.freezing import apply_freeze, plan_freeze

NAMES = ["1", "4", "7"]


def test_items_become_float_images_and_offset_labels() -> None:
    canvases = digit_canvases(3, size=48, height=40, digits=[1, 4, 7], seed=0)
    data = BoxDataset(canvas_items(canvases, NAMES), box_transform(train=False))
    for canvas, (image, target) in zip(canvases, data, strict=True):
        assert image.dtype == torch.float32 and image.shape == (3, 40, 48)
        assert torch.equal((image[0] * 255).round().to(torch.uint8),
                           torch.from_numpy(canvas.pixels))
        assert target["boxes"].tolist() == [list(map(float, b[:4])) for b in canvas.boxes]
        assert target["labels"].tolist() == [NAMES.index(b[4]) + LABEL_OFFSET
                                             for b in canvas.boxes]
    images, targets = collate_boxes([data[0], data[1]])
    assert len(images) == len(targets) == 2


def test_a_flip_moves_the_boxes_with_the_pixels() -> None:
    canvas = digit_canvases(1, size=48, digits=[7], per_canvas=(1, 1), seed=2)[0]
    data = BoxDataset(canvas_items([canvas], NAMES), v2.Compose(
        [v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)]))
    image, target = data[0]
    (x1, y1, x2, y2), = target["boxes"].tolist()
    ink = image[0] > 0
    cols = torch.nonzero(ink.any(0)).flatten()
    rows = torch.nonzero(ink.any(1)).flatten()
    assert (x1, y1, x2, y2) == (cols[0].item(), rows[0].item(), cols[-1].item() + 1,
                                rows[-1].item() + 1)


def test_sanitize_drops_boxes_an_augmentation_left_without_area() -> None:
    sanitize = box_transform(train=True, flip=False)
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[2.0, 2, 10, 10], [5.0, 5, 5.5, 9]]),
                                     format="XYXY", canvas_size=(16, 16))
    _, kept = sanitize(tv_tensors.Image(torch.zeros(3, 16, 16, dtype=torch.uint8)),
                       {"boxes": boxes, "labels": torch.tensor([1, 2])})
    assert kept["boxes"].tolist() == [[2.0, 2.0, 10.0, 10.0]] and kept["labels"].tolist() == [1]


@pytest.mark.filterwarnings("ignore")
def test_the_trainer_fits_a_detector_and_measures_map() -> None:
    torch.manual_seed(0)
    canvases = digit_canvases(20, size=64, digits=[1, 4, 7], seed=0)
    loader = {split: DataLoader(BoxDataset(canvas_items(part, NAMES), box_transform(train)),
                                batch_size=4, shuffle=train, collate_fn=collate_boxes)
              for split, part, train in (("train", canvases[:12], True),
                                         ("val", canvases[12:], False))}
    model = detector_on(backbone_of(torchvision.models.resnet18(), ["layer2", "layer3",
                                                                     "layer4"], 64),
                        "fasterrcnn", len(NAMES), min_size=64, max_size=64)
    freeze = plan_freeze(model, "backbone.fpn")  # the ResNet's stages stay as they are
    apply_freeze(model, freeze)
    body = {k: v.clone() for k, v in model.backbone.body.state_dict().items()}
    heads = {k: v.clone() for k, v in model.roi_heads.state_dict().items()}
    module = DetectorModule(model, len(NAMES), freeze, OmegaConf.structured(OptimConfig),
                            OmegaConf.structured(SchedConfig), task=Detection())
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loader["train"], loader["val"])
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert set(MAP_METRICS) <= set(logged), logged
    assert all(0.0 <= logged[k] <= 1.0 for k in MAP_METRICS), logged
    for loss in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert math.isfinite(logged[f"train/{loss}"])
    assert len(module.per_class_ap) == len(NAMES)
    assert len(module.last_predictions) == 8
    assert all(set(p) == {"boxes", "labels", "scores"} for p in module.last_predictions)
    after = model.backbone.body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in body.items())  # BatchNorm stats too
    moved = model.roi_heads.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in heads.items())


def test_faster_coco_eval_gives_pycocotools_numbers() -> None:
    """The backend finetune measures with agrees with COCO's reference implementation on
    a fixture of many boxes: hits, misses, duplicates, a missed class, scores in every
    range (random, seeded)."""
    from torchmetrics.detection import MeanAveragePrecision

    generator = torch.Generator().manual_seed(0)
    targets, predictions = [], []
    for _ in range(12):
        n = int(torch.randint(1, 5, (), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 80
        wh = 8 + torch.rand(n, 2, generator=generator) * 30
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 4, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
        jitter = (torch.rand(n, 4, generator=generator) - 0.5) * 12
        found = torch.cat([boxes + jitter, torch.rand(2, 2, generator=generator).repeat(1, 2)
                           * 60 + torch.tensor([0.0, 0, 15, 15])])
        predictions.append({"boxes": found, "scores": torch.rand(n + 2, generator=generator),
                            "labels": torch.cat([labels, torch.randint(1, 4, (2,),
                                                                       generator=generator)])})
    results = {}
    for backend in ("faster_coco_eval", "pycocotools"):
        metric = MeanAveragePrecision(iou_type="bbox", class_metrics=True, backend=backend)
        metric.update(predictions, targets)
        results[backend] = metric.compute()
    fast, reference = results["faster_coco_eval"], results["pycocotools"]
    assert 0.05 < float(reference["map"]) < 0.95  # neither trivial nor perfect
    for key in ("map", "map_50", "map_75", "mar_100", "map_per_class"):
        assert torch.allclose(fast[key], reference[key], atol=1e-4), (key, fast[key],
                                                                       reference[key])
