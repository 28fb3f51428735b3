"""The readers behind the data formats: the digits scikit-learn ships, class folders, CSV lists
(of one label, or of label sets), and fake images. Each returns a `Split` and the class names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits as sk_digits

from finetune.data.csv_lists import CsvProblem, read_csv_rows, read_csv_table
from finetune.data.images import IMAGE_SUFFIXES
from finetune.data.splits import Split
from finetune.errors import FinetuneError
from finetune.locations import inside


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


def read_multilabel_csv(csv_path: Path, follow_links: bool = False) -> tuple[Split, list[str]]:
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
    return Split(listed_images(csv_path, [p for p, _ in rows], follow_links), labels), names


FOLLOW_LINKS = "data.follow_links=true"


def confined(paths: list[Path], root: Path, follow_links: bool, what: str) -> list[Path]:
    """`paths`, each of which must resolve (links followed) inside `root` — a received data
    folder or CSV shows only its own files: a symbolic link or a `../` or absolute path to a
    file elsewhere on this machine would put that file into the run's report and CSVs.

    Raises:
        FinetuneError: how many leave `root`, with the first, unless `follow_links` (the
            person typed data.follow_links=true).
    """
    if follow_links:
        return paths
    base = root.resolve()
    outside = [(p, p.resolve()) for p in paths if not inside(p, base)]
    if outside:
        first, target = outside[0]
        raise FinetuneError(
            f"data.root: {len(outside)} image{'s' if len(outside) > 1 else ''} {what} "
            f"{'lie' if len(outside) > 1 else 'lies'} outside {base} (through a symbolic link "
            f"or a ../ or absolute path), e.g. {first} -> {target}; a data folder may use only "
            f"its own files: move them in, or type {FOLLOW_LINKS} on the command line if you "
            "trust where they point")
    return paths


def listed_images(csv_path: Path, listed: list[str], follow_links: bool = False
                  ) -> list[Path]:
    """The images a CSV list names, relative to it; all must exist, inside its folder."""
    paths = [csv_path.parent / p for p in listed]
    missing = [str(p.resolve()) for p in paths if not p.is_file()]
    if missing:
        raise FinetuneError(f"data.root: {len(missing)} images listed in {csv_path} do not "
                            f"exist, e.g. {missing[0]}")
    confined(paths, csv_path.parent, follow_links, f"listed in {csv_path}")
    return [p.resolve() for p in paths]


def load_digits(classes: list[Any] | None) -> tuple[Split, list[str]]:
    """scikit-learn's 1,797 8x8 digits as uint8 RGB tensors, labels in `classes` order."""

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
                subset: bool = False, root: Path | None = None, follow_links: bool = False
                ) -> tuple[Split, list[str]]:
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
    return Split(confined(paths, root or folder, follow_links, f"in {folder}"), labels), names


def read_csv_list(csv_path: Path, classes: list[Any] | None, follow_links: bool = False
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
        return Split(listed_images(csv_path, [r[0] for r in kept], follow_links),
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
