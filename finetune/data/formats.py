"""The data formats, one small object each, found in one table (`FORMATS`).

A format knows what its config needs before anything is read (`problems`) and how to read its
images and class names (`read`: the whole labelled set, and a validation set when the data
brings its own). Splitting, undecodable files, few-shot subsets, transforms and loaders are
the same for every format (finetune/data/datamodule.py, `build_datamodule`). Adding a format is one
class and one entry in FORMATS (docs/extending.md). The module imports no torch:
`data.name` choices are checked from this table at compose time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune.data.csv_lists import SPLIT_NAMES, CsvProblem, read_csv_table
from finetune.extensions import Table


class DataFormat:
    """A kind of labelled image data named by `data=` (`data.name`)."""

    name = ""
    needs_root = False  # data.root names a file or folder that must exist
    label_sets = ""  # task=multilabel: how its label sets are given ("" = it has none)
    holds = "labels"  # what it annotates: class labels, or boxes (task=detection)
    instance_masks = False  # boxes with each object's mask (task=instance_segmentation)

    def problems(self, cfg: Any) -> list[str]:
        """What the data group lacks for this format (checked before anything is read)."""
        if not self.needs_root:
            return []
        root = (OmegaConf.select(cfg, "root", throw_on_missing=False)
                if OmegaConf.is_config(cfg) else cfg.get("root"))
        if root is None or root == "???":
            return [f"data.root is required for data={self.name}; add data.root=PATH"]
        if not Path(str(root)).expanduser().exists():
            return [f"data.root={root!r}: no such path (relative paths start at {Path.cwd()})"]
        return []

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, ...]:
        """(labelled set, its own validation set or None, class names) as data.Split; a
        format whose data brings its own test split returns it fourth (or None)."""
        raise NotImplementedError(self.name)

    def files_root(self, cfg: Any) -> Path | None:
        """The folder every image file of this data lies in (its report shows thumbnails of
        files inside it only); None: the images are not files."""
        if not self.needs_root or cfg.get("root") in (None, "???"):
            return None
        root = Path(str(cfg.root)).expanduser().resolve()
        return root.parent if root.is_file() else root

    def class_names(self, cfg: Any) -> list[str] | None:
        """The classes as far as they can be known without reading images (and without
        torch), for the early checks; None: not known before `read`."""
        return [str(c) for c in cfg.classes] if cfg.get("classes") else None

    def read_label_sets(self, cfg: Any) -> tuple[Any, list[str]]:
        """task=multilabel: (the labelled set, multi-hot tuples as labels; label names)."""
        raise NotImplementedError(self.name)


def label_sets_problem(name: str) -> str | None:
    """Why data=`name` cannot feed task=multilabel (None: it can)."""
    if FORMATS[name].label_sets:
        return None
    able = " or ".join(f"data={f.name} ({f.label_sets})"
                       for f in sorted(FORMATS.values(), key=lambda f: f.name) if f.label_sets)
    return f"task=multilabel reads label sets from {able}, not data={name}"


class Digits(DataFormat):
    """scikit-learn's 1,797 8x8 digits, in memory."""

    name = "digits"

    def class_names(self, cfg: Any) -> list[str] | None:
        return super().class_names(cfg) or [str(d) for d in range(10)]

    label_sets = "even / over_4 / prime"  # each image's digit's properties

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        # lazy: keeps torch off a torch-free path
        from finetune.data.readers import load_digits

        full, names = load_digits(cfg.classes)
        return full, None, names

    def read_label_sets(self, cfg: Any) -> tuple[Any, list[str]]:
        # lazy: keeps torch off a torch-free path
        from finetune.data.readers import multilabel_digits

        return multilabel_digits(cfg.classes)


class Fake(DataFormat):
    """Random uint8 images, for smoke tests and benchmarks."""

    name = "fake"

    def class_names(self, cfg: Any) -> list[str] | None:
        return [str(i) for i in range(cfg.fake_classes)]

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        # lazy: keeps torch off a torch-free path
        from finetune.data.readers import fake_data

        full, names = fake_data(cfg.fake_size, cfg.fake_classes, crop, seed)
        return full, None, names


class Csv(DataFormat):
    """A CSV of path,label rows (paths relative to the CSV)."""

    name = "csv"
    needs_root = True

    def class_names(self, cfg: Any) -> list[str] | None:
        given = super().class_names(cfg)
        path = Path(str(cfg.root)).expanduser()
        if given or self.problems(cfg) or not path.is_file():
            return given
        try:  # the training rows' classes (a split column's val / test rows are not)
            return sorted({label for _, label, split in read_csv_table(path)
                           if split in ("", "train")})
        except CsvProblem:
            return None  # reading the data says what is wrong, with the rest

    label_sets = "path,a;b;c"  # the second column: labels separated by ;

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, ...]:
        # lazy: keeps torch off a torch-free path
        from finetune.data.readers import check_root, read_csv_list

        return read_csv_list(check_root(cfg.root, self.name), cfg.classes,
                             bool(cfg.get("follow_links")))

    def read_label_sets(self, cfg: Any) -> tuple[Any, list[str]]:
        # lazy: keeps torch off a torch-free path
        from finetune.data.readers import check_root, read_multilabel_csv

        return read_multilabel_csv(check_root(cfg.root, self.name),
                                   bool(cfg.get("follow_links")))


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders of an image folder: train/, val/, test/ at its top (their names are
    never classes); without train/, the class folders are the top's other folders."""
    return {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}


class ImageFolder(DataFormat):
    """root/<class>/<image>, or root/train/<class>/... with val/ and test/ beside it (each
    optional: without val/, data.val_fraction of train/ validates); a test/ beside the class
    folders is the test split."""

    name = "imagefolder"
    needs_root = True

    def class_names(self, cfg: Any) -> list[str] | None:
        given = super().class_names(cfg)
        if given or self.problems(cfg):
            return given
        root = Path(str(cfg.root)).expanduser()
        if not root.is_dir():
            return None
        folder = split_folders(root).get("train", root)
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not
                      p.name.startswith(".") and p.name not in SPLIT_NAMES) or None

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, ...]:
        # lazy: keeps torch off a torch-free path
        from finetune.data.readers import check_root, scan_folder

        root = check_root(cfg.root, self.name)
        splits = split_folders(root)
        within = {"root": root, "follow_links": bool(cfg.get("follow_links"))}
        full, names = scan_folder(splits.get("train", root), cfg.classes,
                                  skip=SPLIT_NAMES, **within)
        val = scan_folder(splits["val"], names, subset=True, **within)[0] \
            if "val" in splits else None
        test = scan_folder(splits["test"], names, subset=True, **within)[0] \
            if "test" in splits else None
        return full, val, names, test


FORMATS = Table("data.name", "finetune.data_formats", "data format")
FORMATS.add(Digits(), ImageFolder(), Csv(), Fake())
