"""How good a detector is on labelled images: COCO mAP, AP per class, the precision-recall
curve, and the images it gets most wrong.

One evaluation serves a detection run's validation split after training (evaluation.json,
for its report) and `finetune evaluate` on any labelled box data (eval.json): the detector's
boxes on every image under torch.inference_mode(), then torchmetrics' MeanAveragePrecision
(faster-coco-eval backend, as in training) with its extended summary — mAP over IoU 0.5 to
0.95, mAP@0.5, mAP@0.75, mAR@100, per class AP, AP@0.5 and recall, and the precision at
each of COCO's 101 recall points at IoU 0.5 (the PR curve). The worst images are those with
the most mistakes at IoU 0.5 among boxes scoring at least 0.5 (a true box no found box of
its class matches: missed; a found box matching no true one: false), drawn with the true
boxes in green and the found ones in red.

A Mask R-CNN's masks (a dataset that holds them) are measured as they come, batch by batch,
by a second MeanAveragePrecision with iou_type segm, which keeps them run-length encoded:
an image's masks are image-sized, and holding every one until the end would not fit in
memory on real data. Its figures are mask_map, mask_map_50, mask_map_75, mask_mar_100 and a
mask AP per class; the curve and the rows are the boxes'. Its worst images are counted on
masks (a found mask matches a true one of its class at mask IoU 0.5) while they stream by: the
few worst so far keep their masks, drawn filled, true in green and found in red.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou
from torchvision.utils import draw_segmentation_masks

from finetune.data.box_datasets import BoxDataset, collate_boxes
from finetune.models.detectors import LABEL_OFFSET
from finetune.rundir.box_inference import MASK_ALPHA, draw, found_boxes, png_bytes
from finetune.tasks.instances import MASK_THRESHOLD

WORST_SHOWN = 8  # the worst images a report shows
MATCH_IOU = 0.5  # a found box matches a true one of its class at this IoU (mAP@0.5's)
SHOWN_SCORE = 0.5  # the boxes a person is shown (and that count as mistakes)
THUMBNAIL = 192  # px, the longer side of a worst image in the report
HEADER = ["item", "predicted", "score", "x1", "y1", "x2", "y2"]


@dataclass
class BoxOutputs:
    """A detector's boxes on a set of images, the true boxes, and each image's name; labels
    are the detector's (class index + LABEL_OFFSET)."""

    found: list[dict[str, torch.Tensor]]  # boxes, scores, labels, on the CPU
    targets: list[dict[str, torch.Tensor]]  # boxes, labels
    items: list[str]
    # the masks measured as they came (None: the detector or the data has none)
    mask_metric: MeanAveragePrecision | None = None
    # the images with the most mask mistakes, worst first (None: no masks measured)
    worst_masks: list[MaskMistakes] | None = None


@dataclass
class MaskMistakes:
    """An image's mistakes counted on masks, and its masks to draw: the found ones scoring at
    least SHOWN_SCORE and the true ones, bool (objects, height, width) on the CPU."""

    index: int
    missed: int
    false: int
    found: torch.Tensor
    truth: torch.Tensor


def _map(iou_type: str, backend: str = "faster_coco_eval") -> MeanAveragePrecision:
    # this process's images alone: under DDP only rank zero evaluates (after training)
    return MeanAveragePrecision(iou_type=iou_type, class_metrics=True, extended_summary=True,
                                backend=backend, sync_on_compute=False)


def collect_boxes(model: nn.Module, dataset: BoxDataset, batch_size: int = 4,
                  label_map: list[int] | None = None) -> BoxOutputs:
    """The detector's boxes on every image of `dataset` (eval transform), in order, and its
    masks measured when the dataset holds them.

    Args:
        label_map: the model's class index of each of the dataset's classes (evaluating on
            data whose classes are a subset of the model's, matched by name).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    found, targets = [], []
    masks = _map("segm") if dataset.masks else None
    worst: list[MaskMistakes] = []
    remap = None if label_map is None else torch.as_tensor(label_map, dtype=torch.long)
    with torch.inference_mode():
        for images, truth in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                        collate_fn=collate_boxes):
            out = [{k: v.detach().cpu() for k, v in f.items()}
                   for f in model([image.to(device) for image in images])]
            batch_targets = []
            for t in truth:
                labels = t["labels"]
                if remap is not None:
                    labels = remap[labels - LABEL_OFFSET] + LABEL_OFFSET
                batch_targets.append({"boxes": t["boxes"].float(), "labels": labels})
            if masks is not None and all("masks" in f for f in out):
                found_masks = [{**f, "masks": f["masks"][:, 0] > MASK_THRESHOLD} for f in out]
                true_masks = [{**b, "masks": t["masks"].bool()}
                              for b, t in zip(batch_targets, truth, strict=True)]
                masks.update(found_masks, true_masks)
                worst = worst_so_far(worst, [
                    image_mask_mistakes(len(found) + k, f, t)
                    for k, (f, t) in enumerate(zip(found_masks, true_masks, strict=True))])
            found += [{k: v for k, v in f.items() if k != "masks"} for f in out]
            targets += batch_targets
    model.train(was_training)
    paths = dataset.paths
    items = [str(p) for p in paths] if paths is not None else [f"#{i}" for i in
                                                               range(len(found))]
    measured = masks is not None and bool(masks.detection_mask)
    return BoxOutputs(found, targets, items, masks if measured else None,
                      worst if measured else None)


def image_mask_mistakes(index: int, found: dict[str, torch.Tensor],
                        truth: dict[str, torch.Tensor]) -> MaskMistakes:
    """One image's mask mistakes (`mistakes` on masks: both bool (objects, height, width)),
    with its masks kept to draw."""
    missed, false = mistakes(found, truth, on="masks")
    order = found["scores"].argsort(descending=True)
    shown = order[found["scores"][order] >= SHOWN_SCORE]
    return MaskMistakes(index, missed, false, found["masks"][shown], truth["masks"])


def worst_so_far(kept: list[MaskMistakes], new: list[MaskMistakes],
                 shown: int = WORST_SHOWN) -> list[MaskMistakes]:
    """The `shown` images with the most mistakes among `kept` and `new`, worst first (the
    earlier image first among equals); images without a mistake are not kept."""
    ranked = sorted((m for m in kept + new if m.missed + m.false),
                    key=lambda m: (-(m.missed + m.false), m.index))
    return ranked[:shown]


def _per_class(values: Any) -> list[float]:
    return [] if values is None else [float(v) for v in values.reshape(-1).tolist()]


def _ap(curve: torch.Tensor) -> float | None:
    """COCO's AP from the precision at its recall points (-1: the class had no true box)."""
    kept = curve[curve > -1]
    return round(float(kept.mean()), 6) if kept.numel() else None


def box_metrics(outputs: BoxOutputs, class_names: list[str],
                backend: str = "faster_coco_eval") -> dict[str, Any]:
    """Every figure of a detection evaluation (see the module doc)."""
    metric = _map("bbox", backend)
    metric.update(outputs.found, outputs.targets)
    result = metric.compute()
    classes = [int(c) for c in result["classes"].reshape(-1).tolist()]
    ap, recall = _per_class(result.get("map_per_class")), _per_class(
        result.get("mar_100_per_class"))
    precision = result["precision"]  # (IoU thresholds, 101 recalls, classes, areas, max dets)
    true_counts = torch.bincount(torch.cat([t["labels"] for t in outputs.targets] or [
        torch.zeros(0, dtype=torch.long)]), minlength=len(class_names) + LABEL_OFFSET)
    per_class, curves = [], {}
    for i, name in enumerate(class_names):
        label = i + LABEL_OFFSET
        k = classes.index(label) if label in classes else None
        curve = precision[0, :, k, 0, -1] if k is not None and precision.dim() == 5 else None
        per_class.append({
            "class": name, "ap": round(ap[k], 6) if k is not None and ap[k] > -1 else None,
            "ap_50": _ap(curve) if curve is not None else None,
            "recall": round(recall[k], 6) if k is not None and recall[k] > -1 else None,
            "boxes": int(true_counts[label])})
        if curve is not None and bool((curve > -1).any()):
            curves[name] = [round(float(v), 4) for v in curve.tolist()]
    scalars = {key: round(float(result[key]), 6) for key in ("map", "map_50", "map_75",
                                                            "mar_100")}
    if outputs.mask_metric is not None:
        scalars.update(_mask_figures(outputs.mask_metric.compute(), per_class,
                                     any(len(f["scores"]) for f in outputs.found)))
    return {"images": len(outputs.items), "boxes": int(true_counts.sum()), **scalars,
            "per_class": per_class,
            "pr_curve": {"iou": MATCH_IOU, "recall": [round(r / 100, 2) for r in range(101)],
                         "precision": curves}}


def _mask_figures(result: dict[str, Any], per_class: list[dict[str, Any]], found: bool
                  ) -> dict[str, float]:
    """The mask figures (mask_map...), each class's mask AP added to its row. With true
    objects and nothing found they are 0, as the box figures are (torchmetrics says -1,
    "not measured", for masks there)."""
    classes = [int(c) for c in result["classes"].reshape(-1).tolist()]
    ap = _per_class(result.get("map_per_class"))
    ap = ap if len(ap) == len(classes) else [-1.0] * len(classes)  # none measured: one -1
    for i, row in enumerate(per_class):
        k = classes.index(i + LABEL_OFFSET) if i + LABEL_OFFSET in classes else None
        row["mask_ap"] = round(ap[k], 6) if k is not None and ap[k] > -1 else None
    if not found:
        for row in per_class:
            row["mask_ap"] = 0.0 if row["boxes"] else None
    return {f"mask_{key}": round(float(result[key]) if found else 0.0, 6)
            for key in ("map", "map_50", "map_75", "mar_100")}


def mask_iou(found: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of N and M bool (objects, height, width) masks (0 where both are empty)."""
    a, b = found.flatten(1).float(), truth.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def mistakes(found: dict[str, torch.Tensor], truth: dict[str, torch.Tensor],
             min_score: float = SHOWN_SCORE, iou: float = MATCH_IOU, on: str = "boxes"
             ) -> tuple[int, int]:
    """(missed, false) of one image: found objects scoring at least `min_score`, best first,
    each matched to the unmatched true object of its class it overlaps most (IoU >= `iou`),
    the overlap that of their boxes or (`on="masks"`) of their masks."""
    keep = found["scores"] >= min_score
    shapes, labels = found[on][keep], found["labels"][keep]
    order = found["scores"][keep].argsort(descending=True)
    measure = mask_iou if on == "masks" else box_iou
    overlaps = measure(shapes, truth[on]) if len(shapes) and len(truth[on]) else None
    matched: set[int] = set()
    false = 0
    for i in order.tolist():
        best, best_iou = None, iou
        for j in range(len(truth["labels"])):
            if j in matched or int(truth["labels"][j]) != int(labels[i]):
                continue
            value = float(overlaps[i, j]) if overlaps is not None else 0.0
            if value >= best_iou:
                best, best_iou = j, value
        if best is None:
            false += 1
        else:
            matched.add(best)
    return len(truth["labels"]) - len(matched), false


def worst_images(outputs: BoxOutputs, dataset: BoxDataset, class_names: list[str],
                 shown: int = WORST_SHOWN) -> list[dict[str, Any]]:
    """The images with the most mistakes (missed + false objects), worst first, each with its
    true and found boxes drawn (a PNG data URI: the report needs no other file). With masks
    measured, the mistakes are the masks' and the masks are drawn too."""
    if outputs.worst_masks is not None:
        counted = [(m.index, m.missed, m.false, m) for m in outputs.worst_masks]
    else:
        counted = [(i, *mistakes(f, t), None) for i, (f, t) in enumerate(zip(
            outputs.found, outputs.targets, strict=True))]
        counted = sorted((c for c in counted if c[1] + c[2]),
                         key=lambda c: (-(c[1] + c[2]), c[0]))
    rows = []
    for i, missed, false, masks in counted[:shown]:
        boxes = found_boxes(outputs.found[i], class_names, SHOWN_SCORE)
        truth = [{"box": b.tolist()} for b in outputs.targets[i]["boxes"]]
        rows.append({"item": outputs.items[i], "missed": missed, "false": false,
                     "true_boxes": len(truth), "found_boxes": len(boxes),
                     "thumbnail": thumbnail(dataset, i, boxes, truth, masks)})
    return rows


def thumbnail(dataset: BoxDataset, index: int, found: list[dict[str, Any]],
              truth: list[dict[str, Any]], masks: MaskMistakes | None = None) -> str | None:
    """Image `index` with its boxes drawn (and its true and found masks filled in, green and
    red, when given), at most THUMBNAIL px, as a PNG data URI; None when it cannot be read
    now."""
    try:
        pixels = dataset.image(index)
    except (OSError, ValueError):
        return None
    # scaled to THUMBNAIL px first (small images enlarged, pixels kept sharp), then drawn:
    # the boxes and their labels are as legible on an 8 px digit as on a photo
    factor = THUMBNAIL / max(pixels.shape[-2:])
    mode = "nearest" if factor > 1 else "area"
    pixels = nn.functional.interpolate(pixels[None].float(), scale_factor=factor, mode=mode
                                       )[0].round().clamp(0, 255).byte()
    if masks is not None:
        for shapes, colour in ((masks.truth, "lime"), (masks.found, "red")):
            if len(shapes):
                sized = nn.functional.interpolate(shapes[None].float(), size=pixels.shape[-2:],
                                                  mode="nearest")[0].bool()
                pixels = draw_segmentation_masks(pixels, sized, alpha=MASK_ALPHA,
                                                 colors=colour)
    scaled = [[{**b, "box": [v * factor for v in b["box"]]} for b in boxes]
              for boxes in (found, truth)]
    image = draw(pixels, *scaled)
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def prediction_rows(outputs: BoxOutputs, class_names: list[str]) -> list[list[Any]]:
    """One row per found box (HEADER): item, class, score, x1, y1, x2, y2, best first."""
    return [[item, box["class"], box["score"], *box["box"]]
            for item, found in zip(outputs.items, outputs.found, strict=True)
            for box in found_boxes(found, class_names)]


def evaluate_boxes(model: nn.Module, dataset: BoxDataset, class_names: list[str],
                   batch_size: int = 4, label_map: list[int] | None = None
                   ) -> tuple[dict[str, Any], BoxOutputs]:
    """(every figure and the worst images, the outputs) of a detector on `dataset`."""
    outputs = collect_boxes(model, dataset, batch_size, label_map)
    result = box_metrics(outputs, class_names)
    result["worst"] = worst_images(outputs, dataset, class_names)
    result["match"] = {"iou": MATCH_IOU, "min_score": SHOWN_SCORE,
                       "on": "masks" if outputs.worst_masks is not None else "boxes"}
    return result, outputs
