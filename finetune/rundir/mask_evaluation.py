"""A segmentation model measured on masks: one confusion matrix over the labelled pixels (the
run's classes; a data's classes matched by name), mIoU, pixel accuracy, Dice and IoU per
class from it (finetune/tasks/segmentation.scores, as validation computes them), each
image's own pixel accuracy and mIoU, and the worst images drawn beside their true and
predicted masks — for `finetune evaluate` and the run's report. Without autograd.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from finetune.rundir.mask_inference import palette
from finetune.tasks.segmentation import IGNORED, image_scores, scores

HEADER = ["item", "pixel_acc", "miou"]
WORST = 6  # images the report shows
THUMB = 128  # px, each of the three panels


def _panel(ids: np.ndarray) -> Image.Image:
    """Class ids (IGNORED: white) in VOC's colours."""
    colours = np.array(palette(), dtype=np.uint8).reshape(256, 3)
    rgb = colours[np.clip(ids, 0, 255)]
    rgb[ids == IGNORED] = 255
    return Image.fromarray(rgb, mode="RGB")


def thumbnail(image: torch.Tensor, truth: torch.Tensor, found: torch.Tensor,
              mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    """The image (un-normalised), its true mask and the predicted one, side by side: a PNG
    data URI."""
    pixels = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    pixels = (pixels.clamp(0, 1) * 255).round().byte()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    panels = [Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB"),
              _panel(truth.numpy()), _panel(found.numpy())]
    sheet = Image.new("RGB", (3 * THUMB + 8, THUMB), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel.resize((THUMB, THUMB), Image.NEAREST), (i * (THUMB + 4), 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _worst(model: nn.Module, dataset: Any, kept: torch.Tensor, lookup: torch.Tensor,
           items: list[str] | None, device: torch.device) -> list[dict[str, Any]]:
    """The WORST images by mIoU (then pixel accuracy), each drawn beside its masks."""
    names = items or [f"#{i}" for i in range(len(kept))]
    order = sorted(range(len(kept)), key=lambda i: (float(kept[i, 1].nan_to_num(1.0)),
                                                   float(kept[i, 0])))
    normalize = dataset.transform.transforms[-1]  # mask_transform's last step
    worst = []
    for i in order[:WORST]:
        x, y = dataset[i]
        y = torch.where(y >= 0, lookup[y.clamp(min=0)], y)
        predicted = model(x[None].to(device))["out"][0].argmax(0).cpu()
        worst.append({"item": names[i], "miou": round(float(kept[i, 1]), 4),
                      "pixel_acc": round(float(kept[i, 0]), 4),
                      "thumbnail": thumbnail(x, y, predicted, tuple(normalize.mean),
                                             tuple(normalize.std))})
    return worst


def evaluate_masks(model: nn.Module, dataset: Any, class_names: list[str],
                   batch_size: int = 8, mapping: list[int] | None = None,
                   items: list[str] | None = None) -> tuple[dict[str, Any], list[list[Any]]]:
    """(result, CSV rows) of `model` (load_run's, or a run's own) on `dataset` (a
    MaskDataset: normalised images, ids with IGNORED); `mapping`: the run's class of each data
    class (None: the same)."""
    count = len(class_names)
    lookup = torch.tensor(mapping if mapping is not None else list(range(count)))
    confusion = torch.zeros(count, count, dtype=torch.int64)
    per_image: list[torch.Tensor] = []
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, y in DataLoader(dataset, batch_size=batch_size):
                y = torch.where(y >= 0, lookup[y.clamp(min=0)], y)
                logits = model(x.to(device))["out"].cpu()
                labelled = y >= 0
                index = y[labelled] * count + logits.argmax(1)[labelled]
                confusion += torch.bincount(index, minlength=count * count).view(count, count)
                per_image.append(image_scores(logits, y))
            kept = torch.cat(per_image) if per_image else torch.zeros(0, 2)
            worst = _worst(model, dataset, kept, lookup, items, device)
    finally:
        model.train(was)
    found = scores(confusion)
    names = items or [f"#{i}" for i in range(len(kept))]
    truth = confusion.sum(1).tolist()
    result = {"images": len(kept), "pixels": int(confusion.sum()),
              "miou": round(float(found["miou"]), 6),
              "pixel_acc": round(float(found["pixel_acc"]), 6),
              "dice": round(float(found["dice"]), 6),
              "per_class": [{"class": name, "iou": None if iou != iou else round(iou, 6),
                             "pixels": truth[c]}
                            for c, (name, iou) in enumerate(zip(class_names,
                                                                found["iou"].tolist(),
                                                                strict=True))],
              "confusion": confusion.tolist(), "worst": worst}
    rows = [[names[i], round(float(kept[i, 0]), 4),
             round(float(kept[i, 1]), 4) if kept[i, 1] == kept[i, 1] else ""]
            for i in range(len(kept))]
    return result, rows
