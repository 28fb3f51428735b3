"""Using a detection run dir: the boxes its detector finds in images, written as a CSV (one
row per box) and a JSON (one entry per image), and drawn onto copies of the images.

The detector comes from `load_run` (finetune/rundir/inference.py), rebuilt from the
manifest with its weights loaded strictly; each image goes in at its own size as floats in
[0, 1], as in training (the detector resizes and normalizes), in batches under
torch.inference_mode(). Boxes are x1, y1, x2, y2 in the image's own pixels; a box is kept
when its score is at least `min_score`. A Mask R-CNN's objects each carry their mask too —
its pixels above one half, as COCO's uncompressed RLE of the image's own size in the JSON,
their count in the CSV, and filled in on the drawn copies. The CLI is
finetune/commands/predict.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from finetune.data.box_datasets import image_tensor
from finetune.data.images import open_rgb
from finetune.data.instance_masks import decode, encode
from finetune.errors import FinetuneError
from finetune.models.detectors import LABEL_OFFSET
from finetune.rundir import artifacts
from finetune.rundir.inference import detector_input, max_pixels_of, read_batches
from finetune.tasks.instances import MASK_THRESHOLD

DEFAULT_MIN_SCORE = 0.5  # what a person looks at; evaluation keeps every box (mAP needs them)
BOX_HEADER = ["path", "class", "score", "x1", "y1", "x2", "y2"]
MASK_ALPHA = 0.45  # how opaque a drawn mask is


@dataclass
class BoxPredictions:
    """The boxes found per readable image, and the images that could not be read."""

    classes: list[str]
    min_score: float
    max_pixels: int  # the largest image read (drawing reads them again under it)
    # path, width, height, boxes: [{"class", "score", "box": [x1, y1, x2, y2]}], best first
    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # path, reason


def found_boxes(found: dict[str, torch.Tensor], classes: list[str], min_score: float = 0.0
                ) -> list[dict[str, Any]]:
    """A detector's output for one image as plain boxes (class name, score, x1, y1, x2, y2),
    best first, those scoring at least `min_score`; with a Mask R-CNN's masks, each box's
    mask (COCO RLE) and its pixel count."""
    scores = found["scores"].float().cpu()
    order = [i for i in scores.argsort(descending=True).tolist()
             if float(scores[i]) >= min_score]
    boxes, labels = found["boxes"].float().cpu(), found["labels"].cpu()
    masks = found.get("masks")
    out = []
    for i in order:
        label = int(labels[i]) - LABEL_OFFSET
        entry = {"class": classes[label] if 0 <= label < len(classes) else str(label),
                 "score": round(float(scores[i]), 4),
                 "box": [round(float(v), 1) for v in boxes[i].tolist()]}
        if masks is not None:
            pixels = (masks[i, 0] > MASK_THRESHOLD).cpu().numpy()
            entry["mask"], entry["mask_pixels"] = encode(pixels), int(pixels.sum())
        out.append(entry)
    return out


def predict_boxes(model: nn.Module, paths: list[Path], batch_size: int = 8,
                  max_pixels: int | None = None, min_score: float = DEFAULT_MIN_SCORE
                  ) -> BoxPredictions:
    """The boxes a detector from `load_run` finds in `paths`; unreadable images (and those over
    `max_pixels`, by default the run's data.max_image_pixels) are skipped and listed."""
    if not 0.0 <= min_score <= 1.0:
        raise FinetuneError(f"min_score={min_score}: a score threshold is in [0, 1]")
    out = BoxPredictions(list(model.class_names or []), min_score,
                         max_pixels or max_pixels_of(model))
    device = next(model.parameters()).device
    for names, batch in read_batches(paths, detector_input, batch_size, out.max_pixels,
                                     out.unreadable):
        with torch.inference_mode():
            found = model([image.to(device) for image in batch])
        for path, image, result in zip(names, batch, found, strict=True):
            out.rows.append({"path": path, "width": int(image.shape[-1]),
                             "height": int(image.shape[-2]),
                             "boxes": found_boxes(result, out.classes, min_score)})
    return out


def json_path(csv_path: Path) -> Path:
    """Where the JSON beside a predictions CSV goes (predictions.csv -> predictions.json)."""
    return csv_path.with_suffix(".json") if csv_path.suffix.lower() != ".json" else \
        csv_path.with_name(csv_path.name + ".json")


def write_box_predictions(predictions: BoxPredictions, path: Path) -> Path:
    """The CSV at `path` (one row per box: path, class, score, x1, y1, x2, y2; an image with
    no box has none) and the JSON beside it (every image, its size and its boxes, and the
    images that could not be read); returns the JSON's path."""
    masked = any("mask" in box for row in predictions.rows for box in row["boxes"])
    rows = [[row["path"], box["class"], box["score"], *box["box"],
             *([box.get("mask_pixels")] if masked else [])]
            for row in predictions.rows for box in row["boxes"]]
    artifacts.refuse_links(path)
    artifacts.write_csv(path, [*BOX_HEADER, *(["mask_pixels"] if masked else [])], rows)
    target = json_path(path)
    artifacts.refuse_links(target)
    artifacts.write_json(target, {
        "classes": predictions.classes, "min_score": predictions.min_score,
        "box_format": "xyxy (pixels of the image as read)",
        **({"mask_format": "COCO RLE, uncompressed, of the image's size"} if masked else {}),
        "images": predictions.rows,
        "unreadable": [{"path": p, "reason": r} for p, r in predictions.unreadable]})
    return target


def draw(pixels: torch.Tensor, found: list[dict[str, Any]],
         truth: list[dict[str, Any]] | None = None, width: int = 2) -> torch.Tensor:
    """uint8 (3, H, W) pixels with boxes drawn: true ones (when given) in green, found ones
    in red with their class and score, and their masks (when found) filled in."""
    image = pixels
    shapes = [decode(f["mask"], *pixels.shape[-2:]) for f in found if "mask" in f]
    if shapes:
        image = draw_segmentation_masks(image, torch.from_numpy(np.stack(shapes)),
                                        alpha=MASK_ALPHA)
    if truth:
        image = draw_bounding_boxes(image, torch.tensor([t["box"] for t in truth]).reshape(-1, 4),
                                    colors="lime", width=width)
    if found:
        image = draw_bounding_boxes(
            image, torch.tensor([f["box"] for f in found]).reshape(-1, 4),
            labels=[f"{f['class']} {f['score']:.2f}" for f in found], colors="red",
            width=width)
    return image


def png_bytes(pixels: torch.Tensor) -> bytes:
    """uint8 (3, H, W) pixels as a PNG file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def draw_predictions(predictions: BoxPredictions, folder: Path) -> list[Path]:
    """Each predicted image with its boxes drawn, as `NNNN_<name>.png` in `folder` (made if
    missing; numbered so that images of the same name in different folders stay apart)."""
    if folder.exists() and not folder.is_dir():
        raise FinetuneError(f"draw={folder}: is a file; give a folder for the drawn images")
    artifacts.refuse_links(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, row in enumerate(predictions.rows):
        pixels = image_tensor(np.asarray(open_rgb(Path(row["path"]), predictions.max_pixels)))
        target = folder / f"{i:04d}_{Path(row['path']).stem}.png"
        artifacts.refuse_links(target)
        artifacts.write_bytes(target, png_bytes(draw(pixels, row["boxes"])))
        written.append(target)
    return written
