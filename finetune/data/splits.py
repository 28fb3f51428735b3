"""A labelled set (`Split`) and the ways it is cut: stratified validation and test splits, k folds,
few-shot and per-class limits, undecodable files dropped. Label sets (task=multilabel) are
split without stratification."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from finetune.data.images import DEFAULT_MAX_PIXELS, ImageProblem, open_rgb
from finetune.errors import FinetuneError
from finetune.seeding import derive


def is_multilabel(labels: list[Any]) -> bool:
    return bool(labels) and isinstance(labels[0], tuple)


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
