"""Datamodules: digits (built in), image folders, CSV lists, fake data; their transforms."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode, v2

from finetune.backbones import Preprocessing
from finetune.data_formats import (
    FORMATS,
    CsvProblem,
    label_sets_problem,
    read_csv_rows,
    read_csv_table,
)
from finetune.errors import FinetuneError
from finetune.images import DEFAULT_MAX_PIXELS, ImageProblem, open_rgb
from finetune.precheck import single_class_problem
from finetune.registry import make_transform
from finetune.seeding import derive

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def eval_transform(prep: Preprocessing) -> v2.Compose:
    """The deterministic transform used for validation and prediction."""
    return v2.Compose([*_resize_crop(prep), *_to_normalized(prep)])


def train_transform(prep: Preprocessing, augment: list[Any]) -> v2.Compose:
    """Resize and crop as in eval, then the configured augmentations, then normalize."""
    extra = [make_transform(spec, prep.crop) for spec in augment]
    return v2.Compose([*_resize_crop(prep), *extra, *_to_normalized(prep)])


def check_augment(transform: v2.Compose, prep: Preprocessing, augment: list[Any],
                  sample: Any) -> None:
    """Run the training transform once on a real training image, step by step, so that an
    augmentation that cannot work (a negative or zero size, arguments that only fail on an
    image) is refused at plan time, naming its entry, rather than in the first batch. The
    random state is left as it was: the run draws what it would have drawn."""
    first = len(_resize_crop(prep))
    x = sample
    with torch.random.fork_rng(devices=[]):
        for i, step in enumerate(transform.transforms):
            try:
                x = step(x)
            except Exception as err:  # torchvision raises several types for bad arguments
                where = (f"data.augment[{i - first}] ({augment[i - first]})"
                         if first <= i < first + len(augment) else "data")
                raise FinetuneError(f"{where}: fails on a {prep.crop} px training image: "
                                    f"{' '.join(str(err).split())[:200]}; fix its arguments "
                                    "or remove it") from None


def _resize_crop(prep: Preprocessing) -> list[v2.Transform]:
    mode = InterpolationMode(prep.interpolation)
    gray = [v2.Grayscale(1)] if prep.channels == 1 else []
    return [v2.ToImage(), *gray, v2.Resize(prep.resize, interpolation=mode, antialias=True),
            v2.CenterCrop(prep.crop)]


def _to_normalized(prep: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]


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


def is_multilabel(labels: list[Any]) -> bool:
    return bool(labels) and isinstance(labels[0], tuple)


# In-memory images whose transform is deterministic are transformed once, up to this size.
PRECOMPUTE_BYTES = 2 * 2**30


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
                self.ready = torch.stack([first, *(transform(x) for x in images[1:])])

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
                 decoded: tuple[Any, dict[Path, int], int] | None = None) -> None:
        super().__init__(transform, random)
        self.paths, self.labels, self.max_pixels = paths, labels, max_pixels
        self.described = transform  # what the items are (the feature cache's key)
        self.rows = None
        if decoded is not None:
            from finetune.decoded import Rows

            array, index, skip = decoded
            self.rows = Rows(array, [index[p] for p in paths])
            self.transform = v2.Compose(list(transform.transforms[skip:]))

    def load(self, i: int) -> Any:
        if self.rows is not None:
            return self.rows(i)
        return open_rgb(self.paths[i], self.max_pixels)


@dataclass
class Split:
    """Items of a dataset and their labels, before transforms."""

    items: Any
    labels: list[int]

    def subset(self, index: np.ndarray) -> Split:
        items = self.items[torch.as_tensor(index)] if isinstance(self.items, torch.Tensor) \
            else [self.items[i] for i in index]
        return Split(items, [self.labels[i] for i in index])


def _decode_problem(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    try:
        open_rgb(path, max_pixels)
    except ImageProblem as err:
        return str(err)
    return None


def drop_undecodable(split: Split, names: list[str], policy: str,
                     max_pixels: int = DEFAULT_MAX_PIXELS, every_class: bool = True
                     ) -> tuple[Split, list[tuple[str, str]]]:
    """Decode every image once (threads; PIL releases the GIL): those that fail (or are
    over `max_pixels`) are skipped and returned (path, reason), or refused with `policy`
    error."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(lambda p: _decode_problem(p, max_pixels), split.items))
    bad = [(str(p), r) for p, r in zip(split.items, reasons, strict=True) if r]
    if bad and policy == "error":
        raise FinetuneError(f"data: {len(bad)} image{'s' if len(bad) > 1 else ''} cannot be "
                            f"decoded, e.g. {bad[0][0]} ({bad[0][1]}); fix or remove "
                            f"{'them' if len(bad) > 1 else 'it'}, or set data.on_bad_image=skip "
                            "to train without them")
    kept = split.subset(np.array([i for i, r in enumerate(reasons) if r is None], dtype=int))
    empty = [] if is_multilabel(split.labels) or not every_class else [
        names[c] for c in sorted(set(split.labels) - set(kept.labels))]
    if empty:
        raise FinetuneError(f"data: no image of class {empty[0]} can be decoded (e.g. "
                            f"{bad[0][0]}: {bad[0][1]}); fix the files or leave the class out "
                            "with data.classes")
    return kept, bad


def stratified_split(split: Split, fraction: float, seed: int, key: str = "data.val_fraction"
                     ) -> tuple[Split, Split]:
    """(kept, held out) with every class in the same proportion, the same for the same
    seed."""
    index = np.arange(len(split.labels))
    try:  # (label sets cannot be stratified: a seeded random split)
        train, val = train_test_split(index, test_size=fraction, random_state=seed,
                                      stratify=None if is_multilabel(split.labels)
                                      else split.labels)
    except ValueError as err:  # too few images per class for a stratified split
        raise FinetuneError(f"data: {len(index)} images in {len(set(split.labels))} classes are "
                            f"too few to hold out {key}={fraction} of every class "
                            f"({err}); add images, or give train/, val/ and test/ folders"
                            ) from None
    return split.subset(np.sort(train)), split.subset(np.sort(val))


def limit_per_class(split: Split, names: list[str], limits: dict[str, int], seed: int
                    ) -> Split:
    """At most limits[class] items of each class named there (a seeded random choice),
    before the train/val split: an imbalanced subset to study, or a smaller one."""
    limits = {str(c): n for c, n in limits.items()}
    unknown = [c for c in limits if c not in names]
    if unknown:
        raise FinetuneError(f"data.limit_per_class: {', '.join(map(str, unknown))} is not a "
                            f"class of the data ({', '.join(names[:12])})")
    bad = [f"{c}={n}" for c, n in limits.items()
           if isinstance(n, bool) or not isinstance(n, int) or n < 2]
    if bad:
        raise FinetuneError(f"data.limit_per_class: {', '.join(bad)}: each limit is a whole "
                            "number >= 2 (one for training, one for validation)")
    rng = np.random.default_rng(derive(seed, 4))
    labels = np.asarray(split.labels)
    keep = []
    for label, name in enumerate(names):
        index = np.flatnonzero(labels == label)
        limit = limits.get(name)
        if limit is not None and len(index) > limit:
            index = np.sort(rng.choice(index, size=limit, replace=False))
        keep.append(index)
    return split.subset(np.sort(np.concatenate(keep)))


def fold_split(split: Split, folds: int, fold: int, seed: int) -> tuple[Split, Split]:
    """(train, val) of k-fold cross-validation: scikit-learn's StratifiedKFold, shuffled by
    seed; fold `fold`'s part is the validation set. The folds are disjoint and cover the
    data, every class in proportion in each."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if fold >= folds:
        raise FinetuneError(f"data.fold={fold}: there are {folds} folds (data.folds), "
                            f"numbered 0..{folds - 1}")
    if is_multilabel(split.labels):  # label sets: plain k-fold, shuffled by seed
        parts = list(KFold(n_splits=folds, shuffle=True, random_state=seed % 2**32).split(
            np.zeros(len(split.labels))))
        return split.subset(np.sort(parts[fold][0])), split.subset(np.sort(parts[fold][1]))
    counts = np.bincount(np.asarray(split.labels))
    if counts[counts > 0].min() < folds:
        raise FinetuneError(f"data.folds={folds}: a class has only {counts[counts > 0].min()} "
                            "images, fewer than the folds; use fewer folds or add images")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    train, val = list(splitter.split(np.zeros(len(split.labels)), split.labels))[fold]
    return split.subset(np.sort(train)), split.subset(np.sort(val))


def few_shot(split: Split, size: int, seed: int) -> Split:
    """`size` training items, every class in proportion (at least one each), by seed."""
    if is_multilabel(split.labels):
        kept = np.random.default_rng(derive(seed, 5)).choice(len(split.labels), size,
                                                             replace=False)
        return split.subset(np.sort(kept))
    classes = len(set(split.labels))
    if size < classes:
        raise FinetuneError(f"data.train_size={size}: fewer images than the {classes} classes; "
                            f"use at least {classes}")
    index = np.arange(len(split.labels))
    kept, _ = train_test_split(index, train_size=size, random_state=seed, stratify=split.labels)
    return split.subset(np.sort(kept))


def _select_classes(names: list[str], wanted: list[Any] | None, where: str) -> list[str]:
    if wanted is None:
        return names
    wanted_names = [str(c) for c in wanted]
    unknown = [c for c in wanted_names if c not in names]
    if unknown:
        raise FinetuneError(f"data.classes: {', '.join(unknown)} not found in {where}; "
                            f"available: {', '.join(names)}")
    return wanted_names


DIGIT_PROPERTIES = {"even": lambda d: d % 2 == 0, "over_4": lambda d: d > 4,
                    "prime": lambda d: d in (2, 3, 5, 7)}


def multilabel_digits(classes: list[Any] | None) -> tuple[Split, list[str]]:
    """task=multilabel on the digits: each image's labels are its digit's properties (even,
    over_4, prime: 7 is {over_4, prime}, 4 is {even}, 1 is none of them)."""
    split, digit_names = load_digits(classes)
    names = list(DIGIT_PROPERTIES)
    labels = [tuple(float(test(int(digit_names[label]))) for test in DIGIT_PROPERTIES.values())
              for label in split.labels]
    return Split(split.items, labels), names


def read_multilabel_csv(csv_path: Path) -> tuple[Split, list[str]]:
    """task=multilabel: rows of path,labels with the labels separated by `;` (a row with an
    empty labels cell has none of them)."""
    try:
        rows = read_csv_rows(csv_path, allow_empty_label=True)
    except CsvProblem as err:
        raise FinetuneError(str(err)) from None
    sets = [[x.strip() for x in label.split(";") if x.strip()] for _, label in rows]
    names = sorted({x for labels in sets for x in labels})
    if len(names) < 2:
        raise FinetuneError(f"data.root: {csv_path} names {len(names)} label(s); multi-label "
                            "classification needs at least two (labels separated by ;)")
    labels = [tuple(float(n in set(labels)) for n in names) for labels in sets]
    return Split(listed_images(csv_path, [p for p, _ in rows]), labels), names


def listed_images(csv_path: Path, listed: list[str]) -> list[Path]:
    """The images a CSV list names, relative to it; all must exist."""
    paths = [(csv_path.parent / p).resolve() for p in listed]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FinetuneError(f"data.root: {len(missing)} images listed in {csv_path} do not "
                            f"exist, e.g. {missing[0]}")
    return paths


def load_digits(classes: list[Any] | None) -> tuple[Split, list[str]]:
    """scikit-learn's 1,797 8x8 digits as uint8 RGB tensors, labels in `classes` order."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    names = _select_classes([str(d) for d in range(10)], classes, "the digits 0-9")
    label_of = {int(n): i for i, n in enumerate(names)}
    keep = [i for i, t in enumerate(bunch.target) if int(t) in label_of]
    gray = torch.from_numpy(np.round(bunch.images[keep] * 255.0 / 16.0).astype(np.uint8))
    images = gray[:, None].expand(-1, 3, -1, -1).contiguous()
    return Split(images, [label_of[int(bunch.target[i])] for i in keep]), names


def check_root(root: str | None, kind: str) -> Path:
    if root is None or root == "???":
        raise FinetuneError(f"data.root is required for data={kind}; add data.root=PATH")
    path = Path(root).expanduser()
    if not path.exists():
        raise FinetuneError(f"data.root={root!r}: no such {'file' if kind == 'csv' else 'folder'}"
                            f"; check the path (relative paths start at {Path.cwd()})")
    return path


def scan_folder(folder: Path, classes: list[Any] | None, skip: tuple[str, ...] = (),
                subset: bool = False) -> tuple[Split, list[str]]:
    """folder/<class>/<image>: one subfolder per class, sorted by name (`skip`: folder names
    that are not classes). With `subset` (a val/ or test/ folder), `classes` are the run's
    classes and the folder may hold some of them only; a class folder not among them is
    refused."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and p.name not in skip)
    if not class_dirs:
        raise FinetuneError(f"data.root: {folder} has no class subfolders; expected "
                            f"{folder}/<class>/<image>.png (or train/, val/ and test/ inside "
                            "it)")
    if subset:
        assert classes is not None
        names = [str(c) for c in classes]
        unknown = [p.name for p in class_dirs if p.name not in names]
        if unknown:
            raise FinetuneError(f"data.root: {folder} has class folders the training data "
                                f"has not ({', '.join(unknown[:5])}); every class of a split "
                                f"must be a training class ({', '.join(names[:12])})")
    else:
        names = _select_classes([p.name for p in class_dirs], classes, str(folder))
    paths, labels = [], []
    present = {p.name for p in class_dirs}
    for label, name in enumerate(names):
        if subset and name not in present:
            continue
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in
                       IMAGE_SUFFIXES)
        if not files:
            raise FinetuneError(f"data.root: class folder {folder / name} holds no images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove it")
        paths += files
        labels += [label] * len(files)
    return Split(paths, labels), names


def read_csv_list(csv_path: Path, classes: list[Any] | None
                  ) -> tuple[Split, Split | None, list[str], Split | None]:
    """Rows of `path,label[,split]`; paths relative to the CSV; an optional header is
    skipped. (the training rows, the val rows or None, class names, the test rows or None)."""
    try:
        rows = read_csv_table(csv_path)
    except CsvProblem as err:
        raise FinetuneError(str(err)) from None
    names = _select_classes(sorted({r[1] for r in rows if r[2] in ("", "train")}), classes,
                            str(csv_path))
    label_of = {n: i for i, n in enumerate(names)}
    unknown = sorted({r[1] for r in rows if r[2] in ("val", "test") and r[1] not in label_of
                      and classes is None})
    if unknown:
        raise FinetuneError(f"data.root: {csv_path} has val/test rows of classes no training "
                            f"row has ({', '.join(unknown[:5])}); every class of a split must "
                            "be a training class")

    def part(*splits: str) -> Split | None:
        kept = [r for r in rows if r[2] in splits and r[1] in label_of]
        if not kept and "train" not in splits:
            return None
        return Split(listed_images(csv_path, [r[0] for r in kept]),
                     [label_of[r[1]] for r in kept])

    train = part("", "train")
    assert train is not None
    return train, part("val"), names, part("test")


def fake_data(size: int, num_classes: int, image_size: int, seed: int) -> tuple[Split,
                                                                                list[str]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8,
                           generator=generator)
    labels = [i % num_classes for i in range(size)]
    return Split(images, labels), [str(i) for i in range(num_classes)]


class ImageDataModule(pl.LightningDataModule):
    """Train and val datasets already split; loaders from the data config."""

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
        drop_last = sampler is not None and size > self.batch_size and \
            size % self.batch_size == 1
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(derive(self.seed, 3)))

    def eval_dataset(self, split: str) -> Any:
        """A split (train, val, test, or all of them) with the deterministic eval transform:
        what evaluation reads (images, also after a feature cache replaced the loaders')."""
        parts = [self.splits[name] for name in (("train", "val", "test") if split == "all"
                                                 else (split,)) if name in self.splits]
        if not parts:
            raise FinetuneError(f"split={split}: this data has no such split")
        items = (torch.cat([p.items for p in parts]) if isinstance(parts[0].items, torch.Tensor)
                 else [x for p in parts for x in p.items])
        return self.make_eval(Split(items, [y for p in parts for y in p.labels]))

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
            from torch.utils.data import DistributedSampler

            return self._loader(self.val_set, DistributedSampler(
                self.val_set, num_replicas=world, rank=rank, shuffle=False))
        return self._loader(self.val_set)


def _workers(setting: Any, in_memory: bool) -> int:
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


def read_data(cfg: Any, crop: int, seed: int, task: str) -> tuple[Any, ...]:
    """The data format's labelled set (and own val set, class names, own test set), or for
    task=multilabel the label sets of the formats that have them (csv, digits)."""
    data_format = FORMATS[cfg.name]
    if task != "multilabel":
        return data_format.read(cfg, crop, seed)
    problem = label_sets_problem(cfg.name)
    if problem:
        raise FinetuneError(problem)
    full, names = data_format.read_label_sets(cfg)
    return full, None, names, None


def build_datamodule(cfg: Any, prep: Preprocessing, seed: int,
                     task: str = "multiclass", epochs: int = 1) -> ImageDataModule:
    """The datamodule for `cfg` (the data group): split, transforms and loaders. `epochs`:
    how often the run reads the training set (data.decode_cache=auto caches when > 1)."""
    full, val, names, *rest = read_data(cfg, prep.crop, seed, task)
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
    extra: dict[str, Any] = {} if in_memory else {"max_pixels": max_pixels}
    if not in_memory:
        from finetune import decoded

        every = list(dict.fromkeys([*train.items, *val.items,
                                    *(test.items if test is not None else [])]))
        if decoded.wanted(cfg.get("decode_cache", "false"), len(every), prep, epochs):
            first = v2.Compose(_resize_crop(prep))
            array = decoded.decoded(every, prep, first, max_pixels)
            extra["decoded"] = (array, {p: i for i, p in enumerate(every)},
                                len(first.transforms))
    dataset = TensorImages if in_memory else ImageFiles
    augment = OmegaConf.to_container(cfg.augment) if OmegaConf.is_config(cfg.augment) \
        else list(cfg.augment)
    training = train_transform(prep, augment)
    if augment:
        check_augment(training, prep, augment,
                      open_rgb(train.items[0], max_pixels) if not in_memory else train.items[0])
    def make_eval(part: Split) -> Any:
        return dataset(part.items, part.labels, eval_transform(prep), **extra)

    data = ImageDataModule(
        dataset(train.items, train.labels, training, bool(augment), **extra),
        # (decoded images are an array in memory too: read in the training process on CPU)
        make_eval(val), names, cfg.batch_size,
        _workers(cfg.num_workers, in_memory or "decoded" in extra), seed,
        cfg.get("sampler", "shuffle") == "balanced",
        make_eval(test) if test is not None and test.labels else None,
    )
    data.splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    data.make_eval = make_eval
    data.bad_images = bad
    return data
