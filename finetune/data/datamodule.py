"""Datamodules: digits (built in), image folders, CSV lists, fake data; their transforms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from finetune.compose.precheck import single_class_problem
from finetune.compose.ranges import planned_batch_size
from finetune.data import decoded_cache
from finetune.data.decoded_cache import Rows
from finetune.data.formats import (
    FORMATS,
)
from finetune.data.images import DEFAULT_MAX_PIXELS, open_rgb
from finetune.data.splits import (
    Split,
    drop_undecodable,
    few_shot,
    fold_split,
    limit_per_class,
    stratified_split,
)
from finetune.data.transforms import (
    batch_normalize,
    check_augment,
    eval_transform,
    resize_crop,
    train_transform,
)
from finetune.errors import FinetuneError
from finetune.models.backbones import Preprocessing
from finetune.seeding import derive
from finetune.tasks.table import DEFAULT as DEFAULT_TASK
from finetune.tasks.table import task_of


class EpochShuffle(Sampler):
    """A new order every epoch computed from (seed, epoch) alone, each index paired with the
    seed of its augmentation: a resumed run, any number of workers (persistent or not), sees
    what the uninterrupted run saw. Lightning calls set_epoch before each epoch."""

    def __init__(self, size: int, seed: int, epoch: int = 0,
                 weights: list[float] | None = None) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch
        # data.sampler=balanced: each epoch draws `size` items with replacement, item i with
        # probability proportional to weights[i] (1 / its class's count: every class as often)
        self.weights = torch.tensor(weights, dtype=torch.double) if weights else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(derive(self.seed, self.epoch, 2))
        order = (torch.multinomial(self.weights, self.size, replacement=True,
                                   generator=generator).tolist() if self.weights is not None
                 else torch.randperm(self.size, generator=generator).tolist())
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator).tolist()
        rank, world = distributed()
        if world > 1:  # DDP: every rank its own share of the same order, padded to equal size
            per_rank = -(-self.size // world)
            order, seeds = (v + v[:per_rank * world - self.size] for v in (order, seeds))
            order, seeds = order[rank::world], seeds[rank::world]
        return iter(zip(order, seeds, strict=True))

    def __len__(self) -> int:
        return -(-self.size // distributed()[1])


def distributed() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Images(Dataset):
    """Items by index, or by (index, seed) from EpochShuffle: the seed makes the item's
    random augmentation a function of the seed alone."""

    labels: list[int]

    def __init__(self, transform: Any, random: bool) -> None:
        self.transform, self.random = transform, random
        # what the items are (the feature cache's key): the whole transform, also where its
        # last steps run on the device (data.uint8_batches) or its first came from the cache
        self.described = transform

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Any]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        image = self.load(i)
        if seed is None or not self.random:
            return self.transform(image), target(self.labels[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), target(self.labels[i])


def target(label: Any) -> Any:
    """A class index as it is; a multi-hot label set (task=multilabel) as a float tensor."""
    return torch.tensor(label, dtype=torch.float32) if isinstance(label, tuple) else label


# In-memory images whose transform is deterministic are transformed once, up to this size.
PRECOMPUTE_BYTES = 2 * 2**30


PRECOMPUTE_CHUNK = 512  # images transformed together (bounds the float intermediates)


def precompute(images: torch.Tensor, transform: Any, first: torch.Tensor) -> torch.Tensor:
    """Every image through the deterministic `transform`, stacked: in chunks of images at
    once when the transform gives a batch exactly what it gives each image (torchvision's
    resize, crop and normalize do: tens of times faster than one call per image), else one
    image at a time (a transform that makes views per image, as test-time augmentation's)."""
    pair = images[:2]
    try:
        batched = transform(pair)
    except Exception:  # a transform that takes one image only
        batched = None
    apart = torch.stack([first, *(transform(x) for x in pair[1:])])
    if batched is None or not isinstance(batched, torch.Tensor) or \
            batched.shape != apart.shape or not torch.equal(batched, apart):
        return torch.stack([first, *(transform(x) for x in images[1:])])
    return torch.cat([transform(images[i:i + PRECOMPUTE_CHUNK])
                      for i in range(0, len(images), PRECOMPUTE_CHUNK)]).as_subclass(torch.Tensor)


class TensorImages(_Images):
    """uint8 images held in memory as one (N, 3, H, W) tensor. Without random augmentation
    the transformed tensors are computed once (when they fit in PRECOMPUTE_BYTES): a step
    then only indexes memory, as a hand-written loop over prepared tensors does."""

    def __init__(self, images: torch.Tensor, labels: list[int], transform: Any,
                 random: bool = False) -> None:
        super().__init__(transform, random)
        self.images, self.labels = images, labels
        self.ready: torch.Tensor | None = None
        if not random and len(labels):
            first = transform(images[0])
            if first.numel() * first.element_size() * len(labels) <= PRECOMPUTE_BYTES:
                self.ready = precompute(images, transform, first)

    def load(self, i: int) -> Any:
        return self.images[i]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if self.ready is None:
            return super().__getitem__(key)
        i = key[0] if isinstance(key, tuple) else key
        return self.ready[i], target(self.labels[i])


class ImageFiles(_Images):
    """Images read from files; grayscale, palette and RGBA become RGB. With `decoded` (the
    decoded-image cache: the array and each path's row) items come from the array, already
    through the transform's deterministic first steps, and only the rest is applied."""

    def __init__(self, paths: list[Path], labels: list[int], transform: Any,
                 random: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 decoded: tuple[Any, dict[Path, int], int] | None = None,
                 root: Path | None = None) -> None:
        super().__init__(transform, random)
        self.paths, self.labels, self.max_pixels = paths, labels, max_pixels
        self.root = root  # the data's own folder: a report shows thumbnails of files in it
        self.rows = None
        if decoded is not None:
            self.use_decoded(*decoded)

    def use_decoded(self, array: Any, index: dict[Path, int], skip: int) -> None:
        """Read items from the decoded array (each path's row), past the transform's first
        `skip` steps, which made it."""
        self.rows = Rows(array, [index[p] for p in self.paths])
        # (nothing left: a uint8 eval item is the decoded row itself)
        self.transform = v2.Compose(list(self.transform.transforms[skip:]) or [v2.Identity()])

    def load(self, i: int) -> Any:
        if self.rows is not None:
            return self.rows(i)
        return open_rgb(self.paths[i], self.max_pixels)


class ImageDataModule(pl.LightningDataModule):
    """Train and val datasets already split; loaders from the data config."""

    collate: Any = None  # how a batch is put together (None: torch's default, stacked)
    # data.uint8_batches: the items stop at uint8 and this (to float, normalize) runs on each
    # batch once it is on the device; None: the items are normalized in the loader
    on_device: Any = None
    uint8 = False  # whether the run's loaders give uint8 (kept when a feature cache takes over)
    # drop a training epoch's last batch when it would hold one image (see _loader)
    drops_lone_batch = True

    def __init__(self, train: Any, val: Any, class_names: list[str], batch_size: int,
                 num_workers: int, seed: int = 0, balanced: bool = False,
                 test: Any = None) -> None:
        super().__init__()
        self.train_set, self.val_set, self.class_names = train, val, class_names
        self.test_set = test  # the held-out test split (eval transform), or None
        # the splits before transforms, and how to make an eval-transform dataset of one
        self.splits: dict[str, Split] = {}
        self.make_eval: Any = None
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.balanced = balanced  # data.sampler=balanced
        # The epoch the first train loader starts at: Lightning creates that loader's
        # iterator (workers prefetch from the sampler) before it calls set_epoch.
        self.start_epoch = 0
        self.bad_images: list[tuple[str, str]] = []  # (path, reason): skipped, undecodable
        # image files: decide(features_cached) says whether the decoded-image cache is on, and
        # why; attach_decoded() decodes them into it and reads the datasets' items from there
        self.decide_decoding: Any = None
        self.attach_decoded: Any = None
        self.decode_info: dict[str, str] | None = None  # what was decided (None: not yet)

    def decode_images(self, features_cached: bool = False) -> None:
        """Decide on the decoded-image cache (data.decode_cache) and, when on, decode the image
        files into it, once; a no-op for in-memory data and after the first call."""
        if self.decide_decoding is None or self.decode_info is not None:
            return
        on, reason = self.decide_decoding(features_cached)
        self.decode_info = {"status": "on" if on else "off", "reason": reason}
        if on:
            self.attach_decoded()

    def decode_choice(self, features_cached: bool = False) -> str | None:
        """What decode_images would decide, and why, without decoding (None: in-memory data)."""
        return self.decide_decoding(features_cached)[1] if self.decide_decoding else None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A uint8 batch (data.uint8_batches) becomes what the loader would have given: float,
        normalized, here on the device (a quarter of the bytes crossed to it)."""
        if self.on_device is None:
            return batch
        images, *rest = batch
        return [self.on_device(images), *rest]

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints are written at the end of an epoch: a resumed run starts the next one.
        return {"next_epoch": self.trainer.current_epoch + 1 if self.trainer else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_epoch = int(state.get("next_epoch", 0))

    def _loader(self, dataset: Any, sampler: Sampler | None = None) -> DataLoader:
        # Its own generator: creating an iterator then draws its base seed from it, never from
        # the global stream (Lightning creates the first one at a different point of a resumed
        # run than of an uninterrupted one, which shifted dropout's draws).
        # A training epoch whose last batch would hold one image drops it (another image each
        # epoch: the order is shuffled): BatchNorm cannot train on one value per channel.
        size = len(sampler) if sampler is not None else len(dataset)
        drop_last = self.drops_lone_batch and sampler is not None and \
            size > self.batch_size and size % self.batch_size == 1
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          drop_last=drop_last, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(derive(self.seed, 3)))

    def eval_dataset(self, split: str, transform: Any = None) -> Any:
        """A split (train, val, test, or all of them) with the deterministic eval transform
        (or `transform`: test-time augmentation's views): what evaluation reads (images, also
        after a feature cache replaced the loaders')."""
        parts = [self.splits[name] for name in (("train", "val", "test") if split == "all"
                                                 else (split,)) if name in self.splits]
        if not parts:
            raise FinetuneError(f"split={split}: this data has no such split")
        items = (torch.cat([p.items for p in parts]) if isinstance(parts[0].items, torch.Tensor)
                 else [x for p in parts for x in p.items])
        return self.make_eval(Split(items, [y for p in parts for y in p.labels]), transform)

    def class_counts(self) -> list[int]:
        """Training images per class, in class order."""
        counts = [0] * len(self.class_names)
        for label in self.train_set.labels:
            if isinstance(label, tuple):  # multilabel: positives per label
                counts = [c + int(v) for c, v in zip(counts, label, strict=True)]
            else:
                counts[label] += 1
        return counts

    def train_dataloader(self) -> DataLoader:
        weights = None
        if self.balanced:
            counts = self.class_counts()
            weights = [1.0 / counts[label] for label in self.train_set.labels]
        return self._loader(self.train_set, EpochShuffle(len(self.train_set), self.seed,
                                                         self.start_epoch, weights))

    def val_dataloader(self) -> DataLoader:
        rank, world = distributed()
        if world > 1:  # each rank validates its share; metrics and predictions are gathered
            return self._loader(self.val_set, DistributedSampler(
                self.val_set, num_replicas=world, rank=rank, shuffle=False))
        return self._loader(self.val_set)


def loader_workers(setting: Any, in_memory: bool) -> int:
    """`auto`: files are decoded in one process per core but one (at most 8); in-memory data
    is read in the training process on CPU (workers would only add copies), and by up to 4
    workers when a GPU trains (batches are then assembled while the GPU computes)."""
    if setting == "auto":
        spare = max(0, (os.cpu_count() or 1) - 1)
        if in_memory:
            return min(4, spare) if torch.cuda.is_available() else 0
        return min(8, spare)
    if isinstance(setting, int) and setting >= 0:
        return setting
    raise FinetuneError(f"data.num_workers={setting!r}: use auto or a whole number >= 0")


def uint8_batches(setting: Any, accelerator: Any) -> bool:
    """data.uint8_batches: true, false, or auto: on where the run trains on an accelerator
    (uint8 crosses to it, a quarter of float32's bytes, and it normalizes faster than the
    loader's cores); off on CPU, where in-memory images are normalized once, before the run."""
    mode = str(setting).lower()
    if mode not in ("auto", "true", "false"):
        raise FinetuneError(f"data.uint8_batches={setting!r}: use auto, true or false")
    if mode != "auto":
        return mode == "true"
    return on_accelerator(accelerator)


def on_accelerator(accelerator: Any) -> bool:
    """Whether `trainer.accelerator` trains on something other than the CPU (auto: a CUDA or
    Apple GPU is present)."""
    name = str(accelerator).lower()
    if name == "auto":
        return torch.cuda.is_available() or torch.backends.mps.is_available()
    return name != "cpu"


def build_datamodule(cfg: Any, prep: Preprocessing, seed: int,
                     task: str = DEFAULT_TASK, epochs: int = 1,
                     uint8: bool = False, decode_now: bool = True) -> ImageDataModule:
    """The datamodule for `cfg` (the data group): split, transforms and loaders. `epochs`:
    how often the run reads the training set (data.decode_cache=auto caches when > 1);
    `uint8`: the training and validation items stop at uint8, normalized on the device;
    `decode_now` False: image files are decoded into the decoded-image cache only when
    `decode_images` is called (a run decides once it knows whether its feature cache reads
    the images once)."""
    full, val, names, *rest = task_of(task).read(FORMATS[cfg.name], cfg, prep.crop, seed)
    test: Split | None = rest[0] if rest else None
    bad: list[tuple[str, str]] = []
    one_class = single_class_problem(names, cfg.get("root") or cfg.name)
    if one_class:
        raise FinetuneError(one_class)
    policy = cfg.get("on_bad_image", "skip")
    max_pixels = cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS)
    if not isinstance(full.items, torch.Tensor):  # files: every one must decode
        full, bad = drop_undecodable(full, names, policy, max_pixels)
        for name, part in (("val", val), ("test", test)):
            if part is not None:
                kept, dropped = drop_undecodable(part, names, policy, max_pixels,
                                                 every_class=False)
                bad += dropped
                val, test = (kept, test) if name == "val" else (val, kept)
    if cfg.get("limit_per_class"):
        full = limit_per_class(full, names, dict(cfg.limit_per_class), seed)
    fraction = cfg.get("test_fraction")
    if fraction:
        if test is not None:
            raise FinetuneError(f"data.test_fraction={fraction}: this data brings its own "
                                "test split (a test/ folder or split column); drop one of them")
        full, test = stratified_split(full, fraction, derive(seed, 6) % 2**32,
                                      "data.test_fraction")
    train = full
    folds = cfg.get("folds")
    if folds is not None:
        if val is not None:
            raise FinetuneError("data.folds: this data brings its own validation set (a val/ "
                                "folder); k-fold needs one labelled set: give the folder "
                                "without train/ and val/, or drop data.folds")
        train, val = fold_split(full, folds, cfg.fold, seed)
    elif val is None:
        train, val = stratified_split(full, cfg.val_fraction, seed)
    if cfg.train_size is not None and cfg.train_size < len(train.labels):
        train = few_shot(train, cfg.train_size, seed)
    in_memory = isinstance(full.items, torch.Tensor)
    extra: dict[str, Any] = {} if in_memory else {
        "max_pixels": max_pixels, "root": FORMATS[cfg.name].files_root(cfg)}
    dataset = TensorImages if in_memory else ImageFiles
    augment = OmegaConf.to_container(cfg.augment) if OmegaConf.is_config(cfg.augment) \
        else list(cfg.augment)
    training = train_transform(prep, augment)
    if augment:
        check_augment(training, prep, augment,
                      open_rgb(train.items[0], max_pixels) if not in_memory else train.items[0])

    def make_eval(part: Split, transform: Any = None, normalize: bool = True) -> Any:
        if transform is None:
            made = dataset(part.items, part.labels, eval_transform(prep, normalize), **extra)
            made.described = eval_transform(prep)
            return made
        # another transform reads the files themselves (decoded rows are one view's pixels)
        return dataset(part.items, part.labels, transform,
                       **{k: v for k, v in extra.items() if k != "decoded"})

    train_set = dataset(train.items, train.labels,
                        train_transform(prep, augment, normalize=False) if uint8 else training,
                        bool(augment), **extra)
    train_set.described = training
    data = ImageDataModule(
        train_set,
        # Decoded images keep the files' workers: the augmentation and normalization still
        # run per item, and in the training process they would wait on each step (a run with
        # the cache was slower than one without where `auto` had given files 7 workers).
        make_eval(val, normalize=not uint8), names, planned_batch_size(cfg.batch_size),
        loader_workers(cfg.num_workers, in_memory), seed,
        cfg.get("sampler", "shuffle") == "balanced",
        make_eval(test) if test is not None and test.labels else None,
    )
    data.uint8 = uint8
    data.on_device = batch_normalize(prep) if uint8 else None
    data.splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    data.make_eval = make_eval
    data.bad_images = bad
    if not in_memory:
        every = list(dict.fromkeys([*train.items, *val.items,
                                    *(test.items if test is not None else [])]))

        def attach() -> None:
            first = v2.Compose(resize_crop(prep))
            array = decoded_cache.decoded(every, prep, first, max_pixels)
            extra["decoded"] = (array, {p: i for i, p in enumerate(every)},
                                len(first.transforms))
            for made in (data.train_set, data.val_set, data.test_set):
                if made is not None:
                    made.use_decoded(*extra["decoded"])

        data.decide_decoding = lambda features_cached: decoded_cache.decide(
            cfg.get("decode_cache", "false"), len(every), prep, epochs, features_cached)
        data.attach_decoded = attach
        if decode_now:
            data.decode_images()
    return data
