"""A segmentation run dir's model on images: each image resized and normalised as in
validation, its class maps scaled back to the image's own size and the best class taken per
pixel, without autograd. Written: a palette PNG per image (the palette index is the class id,
as a mask folder's masks are read), optionally an overlay (the image with each class's colour
over it), and a CSV with each image's mask file and the share of its pixels per class.
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
from torch.nn import functional
from torchvision.transforms import v2

from finetune.data.box_datasets import image_tensor
from finetune.data.images import open_rgb
from finetune.rundir import artifacts
from finetune.rundir.inference import max_pixels_of, read_batches

OVERLAY_ALPHA = 0.5  # how much of an overlay pixel is its class's colour (the background: none)


def palette() -> list[int]:
    """Pascal VOC's colour map (the bits of the class id spread over R, G, B): class 0 black,
    then distinct colours; 256 entries, flattened as PIL takes them."""
    colours = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours += [red, green, blue]
    return colours


@dataclass
class MaskPredictions:
    """Per image: its path, its mask (class ids at its own size); and what was skipped."""

    class_names: list[str]
    max_pixels: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def mask_input(model: nn.Module) -> Any:
    """An image as the model was validated on: uint8 RGB, resized to its square side,
    float, normalised (finetune/data/mask_datamodule.mask_transform); also its own size."""
    prep = model.preprocessing
    steps = v2.Compose([v2.Resize((prep.crop, prep.crop), antialias=True),
                        v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(list(prep.mean), list(prep.std))])

    def transform(image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        pixels = image_tensor(np.asarray(image.convert("RGB")))
        return steps(pixels), (image.height, image.width)

    return transform


def predict_masks(model: nn.Module, paths: list[Path], batch_size: int = 8,
                  max_pixels: int | None = None) -> MaskPredictions:
    """The masks a segmentation model from `load_run` gives `paths`; unreadable images (and
    those over `max_pixels`, by default the run's) are skipped and listed."""
    out = MaskPredictions(list(model.class_names), max_pixels or max_pixels_of(model))
    device = next(model.parameters()).device
    with torch.inference_mode():
        for names, batch in read_batches(paths, mask_input(model), batch_size, out.max_pixels,
                                         out.unreadable):
            logits = model(torch.stack([x for x, _ in batch]).to(device))["out"]
            for name, one, (_, size) in zip(names, logits, batch, strict=True):
                scaled = functional.interpolate(one[None], size=size, mode="bilinear",
                                                align_corners=False)
                out.rows.append({"path": name, "mask": scaled[0].argmax(0).cpu().numpy()})
    return out


def mask_png(mask: np.ndarray) -> bytes:
    """A mask as a palette PNG (ids up to 255), VOC's colours."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(pixels: np.ndarray, mask: np.ndarray) -> bytes:
    """The image with each non-background class's colour laid over its pixels."""
    colours = np.array(palette(), dtype=np.float32).reshape(256, 3)[mask.clip(0, 255)]
    blend = np.where((mask > 0)[..., None],
                     (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * colours, pixels)
    buffer = io.BytesIO()
    Image.fromarray(blend.round().astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _names(rows: list[dict[str, Any]]) -> list[str]:
    """A file name per image: its stem, numbered where two images share one."""
    seen: dict[str, int] = {}
    found = []
    for row in rows:
        stem = Path(row["path"]).stem
        seen[stem] = seen.get(stem, 0) + 1
        found.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return found


def write_mask_predictions(predictions: MaskPredictions, output: Path,
                           draw: Path | None = None) -> list[str]:
    """The CSV at `output`, the masks in the folder beside it (<output stem>_masks/) and,
    with `draw`, the overlays there; returns what was written."""
    folder = output.with_name(f"{output.stem}_masks")
    folder.mkdir(exist_ok=True)
    if draw is not None:
        draw.mkdir(parents=True, exist_ok=True)
    names, classes = _names(predictions.rows), predictions.class_names
    rows = []
    for name, row in zip(names, predictions.rows, strict=True):
        mask = row["mask"]
        artifacts.write_bytes(folder / f"{name}.png", mask_png(mask))
        if draw is not None:
            pixels = np.asarray(open_rgb(Path(row["path"]), predictions.max_pixels),
                                dtype=np.float32)
            artifacts.write_bytes(draw / f"{name}.png", overlay_png(pixels, mask))
        shares = np.bincount(mask.reshape(-1), minlength=len(classes)) / max(1, mask.size)
        rows.append([row["path"], f"{folder.name}/{name}.png",
                     *(round(float(v), 4) for v in shares[:len(classes)])])
    artifacts.write_csv(output, ["path", "mask", *(f"share_{c}" for c in classes)], rows)
    written = [str(output), f"{len(rows)} masks in {folder}"]
    return written + ([f"{len(rows)} overlays in {draw}"] if draw is not None else [])
