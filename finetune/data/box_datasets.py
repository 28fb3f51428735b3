"""Box data as a model takes it: each image as a float tv_tensors.Image in [0, 1] (any size:
the detector resizes) and its target — boxes as tv_tensors.BoundingBoxes (x1,y1,x2,y2 in
pixels) and labels offset for the background — through torchvision.transforms.v2, which
moves the boxes with the pixels; SanitizeBoundingBoxes drops what an augmentation left
without area. For instance masks the target also holds each object's mask, a tv_tensors.Mask
(objects, height, width) that moves with the pixels too. Batches are lists (images differ in
size and in box count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from finetune.data.boxes import BoxSet
from finetune.data.canvases import Canvas
from finetune.data.images import open_rgb
from finetune.data.instance_masks import canvas_instances, decode
from finetune.models.detectors import LABEL_OFFSET


@dataclass(frozen=True)
class BoxItem:
    """One image (a file, or grey or RGB pixels in memory) and its boxes (x1, y1, x2, y2)
    with the index of each box's class in the run's class names."""

    source: Path | np.ndarray
    boxes: tuple[tuple[float, float, float, float], ...]
    classes: tuple[int, ...]
    # each object's mask: its COCO segmentation as written, or a boolean array (canvases)
    shapes: tuple[Any, ...] = ()


def items_of(found: BoxSet, class_names: list[str]) -> list[BoxItem]:
    """A checked BoxSet's images as items, classes by their place in `class_names`."""
    index = {n: i for i, n in enumerate(class_names)}
    return [BoxItem(i.path, tuple((b.x1, b.y1, b.x2, b.y2) for b in i.boxes),
                    tuple(index[b.label] for b in i.boxes),
                    tuple(b.shape for b in i.boxes)) for i in found.images]


def canvas_items(canvases: list[Canvas], class_names: list[str]) -> list[BoxItem]:
    """Digit canvases (finetune/data/canvases.py) as items."""
    index = {n: i for i, n in enumerate(class_names)}
    return [BoxItem(c.pixels, tuple(tuple(map(float, b[:4])) for b in c.boxes),
                    tuple(index[b[4]] for b in c.boxes),
                    tuple(canvas_instances(c.pixels, c.boxes))) for c in canvases]


def box_transform(train: bool, flip: bool = True, augment: Sequence[v2.Transform] = ()
                  ) -> v2.Transform:
    """uint8 image and boxes in, float image in [0, 1] out; in training a horizontal flip
    (boxes mirrored with the pixels) when `flip`, then `augment` (data.augment, box-aware v2
    transforms), and boxes left without area dropped."""
    steps: list[v2.Transform] = []
    if train and flip:
        steps.append(v2.RandomHorizontalFlip())
    if train:
        steps += list(augment)
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train:
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(steps)


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """Grey (height, width) or RGB (height, width, 3) uint8 pixels as a uint8 (3, height,
    width) tensor: what a detector is given, in training and in use."""
    tensor = torch.from_numpy(np.array(pixels, copy=not pixels.flags.writeable))
    return tensor.expand(3, -1, -1) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


class BoxDataset(Dataset):
    """Items through a v2 transform: (image, {"boxes", "labels"}), and "masks" when `masks`
    (instance masks: the items' shapes, checked by the pre-flight check)."""

    def __init__(self, items: list[BoxItem], transform: v2.Transform, masks: bool = False
                 ) -> None:
        self.items, self.transform, self.masks = items, transform, masks

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path] | None:
        """The image files, as ImageFiles has them (None: the images are in memory)."""
        sources = [item.source for item in self.items]
        return sources if all(isinstance(x, Path) for x in sources) else None  # type: ignore

    @property
    def labels(self) -> list[tuple[int, ...]]:
        """Each item's box classes (what a task's `finish` reads of a validation set)."""
        return [item.classes for item in self.items]

    def image(self, index: int) -> torch.Tensor:
        """The item's pixels as a uint8 (3, height, width) tensor."""
        source = self.items[index].source
        return image_tensor(np.asarray(open_rgb(source)) if isinstance(source, Path)
                            else source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        item = self.items[index]
        pixels = self.image(index)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(item.boxes, dtype=torch.float32).reshape(-1, 4),
                format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(pixels.shape[-2:])),
            "labels": torch.tensor(item.classes, dtype=torch.int64) + LABEL_OFFSET}
        if self.masks:
            target["masks"] = tv_tensors.Mask(self.object_masks(index, *pixels.shape[-2:]))
        image, target = self.transform(tv_tensors.Image(pixels), target)
        return image.as_subclass(torch.Tensor), {
            key: value.as_subclass(torch.Tensor) if isinstance(value, tv_tensors.TVTensor)
            else value for key, value in target.items()}

    def object_masks(self, index: int, height: int, width: int) -> torch.Tensor:
        """The item's objects as a uint8 (objects, height, width) tensor."""
        shapes = self.items[index].shapes
        arrays = [shape if isinstance(shape, np.ndarray) else decode(shape, height, width)
                  for shape in shapes]
        if not arrays:
            return torch.zeros(0, height, width, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays).astype(np.uint8))


def collate_boxes(batch: list[tuple[torch.Tensor, dict[str, Any]]]
                  ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """A batch as the detectors take it: a list of images and a list of targets."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)
