"""The datamodule of `task: segmentation`: masks read and checked before anything trains
(every problem at once, finetune/data/masks.py), a seeded random validation split, and
mask-aware transforms — torchvision.transforms.v2 moves a tv_tensors.Mask with the pixels
(nearest-neighbour when it resizes). Each item is (image: float, normalised, (3, S, S);
mask: int64 (S, S), unlabelled pixels IGNORED), S = data.image_size, so batches stack. The
epoch order, its resume and DDP's shares are ImageDataModule's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from finetune.compose.ranges import planned_batch_size
from finetune.data.box_datamodule import split_items
from finetune.data.box_datasets import image_tensor
from finetune.data.datamodule import ImageDataModule, loader_workers
from finetune.data.formats import FORMATS
from finetune.data.images import open_rgb
from finetune.data.mask_formats import DigitMasks
from finetune.data.masks import canvas_mask, check_masks, mask_ids
from finetune.errors import ConfigError, FinetuneError
from finetune.models.backbones import Preprocessing
from finetune.registry import make_transform
from finetune.seeding import derive
from finetune.tasks.segmentation import IGNORED

DEFAULT_SIZE = 520  # torchvision's segmentation references train on 520 px


@dataclass(frozen=True)
class MaskItem:
    """One image (a file, or grey pixels in memory) and its mask (a file, or ids)."""

    source: Path | np.ndarray
    mask: Path | np.ndarray


def mask_transform(size: int, prep: Preprocessing, train: bool,
                   augment: list[v2.Transform] | None = None) -> v2.Transform:
    """uint8 image and mask in: both resized to size x size (the mask by its nearest pixel),
    in training `augment` (data.augment: v2 transforms, which move the mask with the
    pixels), then the image to float, normalised as the weights expect."""
    steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)]
    steps += list(augment or []) if train else []
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
              v2.Normalize(list(prep.mean), list(prep.std))]
    return v2.Compose(steps)


class MaskDataset(Dataset):
    """Items through a v2 transform: (image, mask)."""

    def __init__(self, items: list[MaskItem], transform: v2.Transform,
                 ignore_index: int) -> None:
        self.items, self.transform, self.ignore_index = items, transform, ignore_index

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path] | None:
        """The image files (None: the images are in memory)."""
        sources = [item.source for item in self.items]
        return sources if all(isinstance(x, Path) for x in sources) else None  # type: ignore

    @property
    def labels(self) -> list[None]:
        """No label per image (what a task's `finish` reads of a validation set)."""
        return [None] * len(self.items)

    def image(self, index: int) -> torch.Tensor:
        """The item's pixels as a uint8 (3, height, width) tensor."""
        source = self.items[index].source
        return image_tensor(np.asarray(open_rgb(source)) if isinstance(source, Path)
                            else source)

    def mask(self, index: int) -> torch.Tensor:
        """The item's ids (height, width), unlabelled pixels IGNORED."""
        source = self.items[index].mask
        ids = torch.from_numpy(mask_ids(source) if isinstance(source, Path)
                               else np.asarray(source, dtype=np.int64))
        return ids.masked_fill(ids == self.ignore_index, IGNORED)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:  # EpochShuffle's (index, seed): the seed decides the draw
                torch.manual_seed(seed)
            image, mask = self.transform(tv_tensors.Image(self.image(index)),
                                         tv_tensors.Mask(self.mask(index)))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class MaskDataModule(ImageDataModule):
    """Train and val mask datasets already split; stacked batches."""

    def class_counts(self) -> list[int]:
        """Labelled training pixels per class, in class order (as read, before resizing)."""
        counts = np.zeros(len(self.class_names), dtype=np.int64)
        for index in range(len(self.train_set)):
            ids = self.train_set.mask(index).numpy()
            counts += np.bincount(ids[ids >= 0], minlength=len(counts))[:len(counts)]
        return counts.tolist()


def read_mask_items(cfg: Any, num_classes: int | None, seed: int
                    ) -> tuple[list[MaskItem], list[MaskItem], list[str]]:
    """(training items, validation items, class names) of the data group `cfg`, after the
    pre-flight check: every problem found raises, together."""
    data_format = FORMATS[cfg.name]
    if isinstance(data_format, DigitMasks):  # generated: its own validation canvases
        names = data_format.class_names(cfg) or []
        if num_classes is not None and num_classes != len(names):
            raise FinetuneError(f"head.num_classes={num_classes}, but data=digit_masks has "
                                f"{len(names)} classes (background and the digits "
                                f"{', '.join(names[1:])}); set head.num_classes={len(names)} "
                                "or leave it out")
        train, val = data_format.canvases(cfg, seed, cfg.val_fraction)
        return ([MaskItem(c.pixels, canvas_mask(c.pixels, c.boxes, names)) for c in train],
                [MaskItem(c.pixels, canvas_mask(c.pixels, c.boxes, names)) for c in val], names)
    found = data_format.read_masks(cfg)
    problems = check_masks(found, int(cfg.ignore_index), num_classes)
    if problems:
        raise ConfigError([f"data={cfg.name} ({cfg.root}): {p}" for p in problems])
    if len(found.pairs) < 2:
        raise FinetuneError(f"data.root={cfg.root}: {len(found.pairs)} image(s) with a mask; "
                            "at least one to train on and one to validate are needed")
    items = [MaskItem(pair.image, pair.mask) for pair in found.pairs]
    train, val = split_items(items, cfg.val_fraction, seed)
    return train, val, list(found.classes or [])


def input_size(cfg: Any) -> int:
    """The side every image and mask is resized to: data.image_size, else the canvases' side,
    else 520."""
    if cfg.image_size:
        return int(cfg.image_size)
    return int(cfg.canvases.size) if cfg.name == "digit_masks" else DEFAULT_SIZE


def build_mask_datamodule(cfg: Any, prep: Preprocessing, num_classes: int | None,
                          seed: int) -> MaskDataModule:
    """The datamodule of mask data `cfg` (the data group); `num_classes`: head.num_classes."""
    train, val, names = read_mask_items(cfg, num_classes, seed)
    if cfg.train_size is not None and cfg.train_size < len(train):
        keep = sorted(random.Random(derive(seed, 8)).sample(range(len(train)), cfg.train_size))
        train = [train[i] for i in keep]
    size = input_size(cfg)
    specs = OmegaConf.to_container(cfg.augment) if OmegaConf.is_config(cfg.augment) \
        else list(cfg.augment)
    augment = [make_transform(spec, size, f"data.augment[{i}]") for i, spec in enumerate(specs)]
    ignore = int(cfg.ignore_index)
    training = MaskDataset(train, mask_transform(size, prep, True, augment), ignore)
    if augment:  # an augmentation that cannot work is refused now, naming it
        try:
            training[(0, seed)]
        except Exception as err:  # torchvision raises several types for bad arguments
            raise FinetuneError(f"data.augment: fails on a training image with its mask: "
                                f"{' '.join(str(err).split())[:200]}; fix its arguments or "
                                "remove it") from None
    return MaskDataModule(training, MaskDataset(val, mask_transform(size, prep, False), ignore),
                          names, planned_batch_size(cfg.batch_size),
                          loader_workers(cfg.num_workers, cfg.root is None), seed)
