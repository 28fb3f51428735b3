"""The datamodule of `task: detection`: the annotations read and checked before anything
trains (every problem at once, finetune/data/box_checks.py), a seeded random validation
split, box-aware training transforms, and list batches; the same seeded, DDP-aware epoch
order as class-label data (finetune/data/datamodule.EpochShuffle).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from omegaconf import OmegaConf

from finetune.compose.ranges import planned_batch_size
from finetune.data.box_checks import check_boxes
from finetune.data.box_datasets import (
    BoxDataset,
    BoxItem,
    box_transform,
    canvas_items,
    collate_boxes,
    items_of,
)
from finetune.data.box_formats import DigitCanvases
from finetune.data.datamodule import ImageDataModule, loader_workers
from finetune.data.formats import FORMATS
from finetune.errors import ConfigError, FinetuneError
from finetune.registry import make_transform
from finetune.seeding import derive


class SeededBoxes(BoxDataset):
    """Items by index, or by (index, seed) from EpochShuffle: the seed alone decides the
    item's random augmentation (a resumed run, any number of workers, draws the same)."""

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return super().__getitem__(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return super().__getitem__(index)


class BoxDataModule(ImageDataModule):
    """Train and val box datasets already split; list batches (images differ in size and in
    box count). The epoch order, its resume and DDP's shares are ImageDataModule's."""

    collate = staticmethod(collate_boxes)
    # a batch of one image is fine here: BatchNorm sees its feature maps, not one value
    drops_lone_batch = False

    def class_counts(self) -> list[int]:
        """Training boxes per class, in class order."""
        counts = [0] * len(self.class_names)
        for item in self.train_set.items:
            for c in item.classes:
                counts[c] += 1
        return counts


def split_items(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random validation share (at least one image, at least one left to train)."""
    order = list(range(len(items)))
    random.Random(derive(seed, 7)).shuffle(order)
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    val = set(order[:count])
    return ([x for i, x in enumerate(items) if i not in val],
            [x for i, x in enumerate(items) if i in val])


def read_box_items(cfg: Any, num_classes: int | None, seed: int, masks: bool = False
                   ) -> tuple[list[BoxItem], list[BoxItem], list[str]]:
    """(training items, validation items, class names) of the data group `cfg`, after the
    label pre-flight check (with `masks`, of every object's mask too): every problem found
    raises, together."""
    data_format = FORMATS[cfg.name]
    if isinstance(data_format, DigitCanvases):  # generated: its own validation canvases
        names = data_format.class_names(cfg) or []
        if num_classes is not None and num_classes != len(names):
            raise FinetuneError(f"head.num_classes={num_classes}, but data.classes names "
                                f"{len(names)} digits ({', '.join(names)}); the background is "
                                f"not a class here (finetune adds it): set head.num_classes="
                                f"{len(names)} or leave it out")
        train, val = data_format.canvases(cfg, seed, cfg.val_fraction)
        return canvas_items(train, names), canvas_items(val, names), names
    found = data_format.read_boxes(cfg)
    classes = [str(c) for c in cfg.classes] if cfg.get("classes") else None
    checked = check_boxes(found, classes=classes, num_classes=num_classes,
                          empty=cfg.empty_images,
                          box_format=cfg.box_format if cfg.name == "box_csv" else None,
                          masks=masks)
    if checked.problems:
        raise ConfigError([f"data={cfg.name} ({cfg.root}): {p}" for p in checked.problems])
    names = classes or found.classes
    items = items_of(found, names)
    if len(items) < 2:
        raise FinetuneError(f"data.root={cfg.root}: {len(items)} image(s); a detector needs "
                            "at least one to train on and one to validate")
    train, val = split_items(items, cfg.val_fraction, seed)
    return train, val, names


def build_box_datamodule(cfg: Any, num_classes: int | None, seed: int, masks: bool = False
                         ) -> BoxDataModule:
    """The datamodule of box data `cfg` (the data group); `num_classes`: head.num_classes;
    `masks`: the targets hold each object's mask too (instance masks)."""
    train, val, names = read_box_items(cfg, num_classes, seed, masks)
    if cfg.train_size is not None and cfg.train_size < len(train):
        keep = sorted(random.Random(derive(seed, 8)).sample(range(len(train)), cfg.train_size))
        train = [train[i] for i in keep]
    specs = OmegaConf.to_container(cfg.augment) if OmegaConf.is_config(cfg.augment) \
        else list(cfg.augment)
    augment = [make_transform(spec, cfg.image_size or 800, f"data.augment[{i}]")
               for i, spec in enumerate(specs)]
    training = SeededBoxes(train, box_transform(True, flip=False, augment=augment), masks)
    if augment:  # an augmentation that cannot work is refused now, naming it
        try:
            with torch.random.fork_rng(devices=[]):
                training[0]
        except Exception as err:  # torchvision raises several types for bad arguments
            raise FinetuneError(f"data.augment: fails on a training image with its boxes: "
                                f"{' '.join(str(err).split())[:200]}; fix its arguments or "
                                "remove it") from None
    return BoxDataModule(training, SeededBoxes(val, box_transform(False), masks), names,
                         planned_batch_size(cfg.batch_size),
                         loader_workers(cfg.num_workers, cfg.root is None), seed)
