"""The datamodule of `task: detection`: the annotations read and checked before anything
trains (every problem at once, finetune/data/box_checks.py), a seeded random validation
split, box-aware training transforms, and list batches; the same seeded, DDP-aware epoch
order as class-label data (finetune/data/datamodule.EpochShuffle).
"""

from __future__ import annotations

import random
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from finetune.data.box_checks import check_boxes
from finetune.data.box_datasets import (
    BoxDataset,
    BoxItem,
    box_transform,
    canvas_items,
    collate_boxes,
    items_of,
)
from finetune.data.datamodule import EpochShuffle, _workers, distributed
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


class BoxDataModule(pl.LightningDataModule):
    """Train and val box datasets already split; list batches."""

    def __init__(self, train: BoxDataset, val: BoxDataset, class_names: list[str],
                 batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.train_set, self.val_set, self.class_names = train, val, class_names
        self.test_set = None
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.start_epoch = 0
        self.balanced = False
        self.bad_images: list[tuple[str, str]] = []  # the pre-flight check refuses them instead

    def state_dict(self) -> dict[str, Any]:
        return {"next_epoch": self.trainer.current_epoch + 1 if self.trainer else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_epoch = int(state.get("next_epoch", 0))

    def class_counts(self) -> list[int]:
        """Training boxes per class, in class order."""
        counts = [0] * len(self.class_names)
        for item in self.train_set.items:
            for c in item.classes:
                counts[c] += 1
        return counts

    def _loader(self, dataset: BoxDataset, sampler: Any = None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_boxes, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(derive(self.seed, 3)))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, EpochShuffle(len(self.train_set), self.seed,
                                                         self.start_epoch))

    def val_dataloader(self) -> DataLoader:
        rank, world = distributed()
        if world > 1:  # each rank validates its share; the metric gathers them
            return self._loader(self.val_set, DistributedSampler(
                self.val_set, num_replicas=world, rank=rank, shuffle=False))
        return self._loader(self.val_set)


def _split(items: list[BoxItem], fraction: float, seed: int) -> tuple[list[BoxItem],
                                                                         list[BoxItem]]:
    """A seeded random validation share (at least one image, at least one left to train)."""
    order = list(range(len(items)))
    random.Random(derive(seed, 7)).shuffle(order)
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    val = set(order[:count])
    return ([x for i, x in enumerate(items) if i not in val],
            [x for i, x in enumerate(items) if i in val])


def read_box_items(cfg: Any, num_classes: int | None, seed: int
                   ) -> tuple[list[BoxItem], list[BoxItem], list[str]]:
    """(training items, validation items, class names) of the data group `cfg`, after the
    label pre-flight check: every problem found raises, together."""
    data_format = FORMATS[cfg.name]
    if hasattr(data_format, "canvases"):
        names = data_format.class_names(cfg) or []
        if num_classes is not None and num_classes != len(names):
            raise FinetuneError(f"head.num_classes={num_classes}, but data.classes names "
                                f"{len(names)} digits ({', '.join(names)}); the background is "
                                f"not a class here (finetune adds it): set head.num_classes="
                                f"{len(names)} or leave it out")
        train, val = data_format.canvases(cfg, seed, cfg.val_fraction)
        return canvas_items(train, names), canvas_items(val, names), names
    found, own_val = data_format.read_boxes(cfg)
    classes = [str(c) for c in cfg.classes] if cfg.get("classes") else None
    checked = check_boxes(found, classes=classes, num_classes=num_classes,
                          empty=cfg.empty_images,
                          box_format=cfg.box_format if cfg.name == "box_csv" else None)
    if checked.problems:
        raise ConfigError([f"data={cfg.name} ({cfg.root}): {p}" for p in checked.problems])
    names = classes or found.classes
    items = items_of(found, names)
    if own_val is not None:
        return items, items_of(own_val, names), names
    if len(items) < 2:
        raise FinetuneError(f"data.root={cfg.root}: {len(items)} image(s); a detector needs "
                            "at least one to train on and one to validate")
    train, val = _split(items, cfg.val_fraction, seed)
    return train, val, names


def build_box_datamodule(cfg: Any, num_classes: int | None, seed: int) -> BoxDataModule:
    """The datamodule of box data `cfg` (the data group); `num_classes`: head.num_classes."""
    train, val, names = read_box_items(cfg, num_classes, seed)
    if cfg.train_size is not None and cfg.train_size < len(train):
        keep = sorted(random.Random(derive(seed, 8)).sample(range(len(train)), cfg.train_size))
        train = [train[i] for i in keep]
    specs = OmegaConf.to_container(cfg.augment) if OmegaConf.is_config(cfg.augment) \
        else list(cfg.augment)
    augment = [make_transform(spec, cfg.image_size or 800, f"data.augment[{i}]")
               for i, spec in enumerate(specs)]
    training = SeededBoxes(train, box_transform(True, flip=False, augment=augment))
    if augment:  # an augmentation that cannot work is refused now, naming it
        try:
            with torch.random.fork_rng(devices=[]):
                training[0]
        except Exception as err:  # torchvision raises several types for bad arguments
            raise FinetuneError(f"data.augment: fails on a training image with its boxes: "
                                f"{' '.join(str(err).split())[:200]}; fix its arguments or "
                                "remove it") from None
    return BoxDataModule(training, SeededBoxes(val, box_transform(False)), names,
                         cfg.batch_size, _workers(cfg.num_workers, cfg.root is None), seed)
