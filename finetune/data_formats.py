"""The data formats, one small object each, found in one table (`FORMATS`).

A format knows what its config needs before anything is read (`problems`) and how to read its
images and class names (`read`: the whole labelled set, and a validation set when the data
brings its own). Splitting, undecodable files, few-shot subsets, transforms and loaders are
the same for every format (finetune/data.py, `build_datamodule`). Adding a format is one
class and one entry in FORMATS (docs/extending.md). The module imports no torch:
`data.name` choices are checked from this table at compose time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


class DataFormat:
    """A kind of labelled image data named by `data=` (`data.name`)."""

    name = ""
    needs_root = False  # data.root names a file or folder that must exist
    label_sets = ""  # task=multilabel: how its label sets are given ("" = it has none)

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

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        """(labelled set, its own validation set or None, class names) as data.Split."""
        raise NotImplementedError(self.name)

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
        from finetune.data import load_digits

        full, names = load_digits(cfg.classes)
        return full, None, names

    def read_label_sets(self, cfg: Any) -> tuple[Any, list[str]]:
        from finetune.data import multilabel_digits

        return multilabel_digits(cfg.classes)


class Fake(DataFormat):
    """Random uint8 images, for smoke tests and benchmarks."""

    name = "fake"

    def class_names(self, cfg: Any) -> list[str] | None:
        return [str(i) for i in range(cfg.fake_classes)]

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        from finetune.data import fake_data

        full, names = fake_data(cfg.fake_size, cfg.fake_classes, crop, seed)
        return full, None, names


MAX_CSV_BYTES = 1 << 30


class CsvProblem(Exception):
    """A CSV list that cannot be read as path,label rows (the message says why)."""


def read_csv_rows(path: Path, allow_empty_label: bool = False) -> list[tuple[str, str]]:
    """The (path, label) rows of a CSV list: UTF-8 (a byte-order mark is fine), an optional
    `path,label` header, `#` comment lines and blank lines skipped.

    Raises:
        CsvProblem: not UTF-8 text, not CSV, no rows, or rows without a path or a label;
            every bad row counted in one sentence.
    """
    import csv
    import io

    from finetune.safe_files import UnsafeFile, read_text

    try:
        text = read_text(path, MAX_CSV_BYTES, "data.root:")
    except UnsafeFile as err:
        raise CsvProblem(str(err)) from None
    try:
        rows = [(reader.line_num, r) for reader in [csv.reader(io.StringIO(text, newline=""))]
                for r in reader if r and not r[0].lstrip().startswith("#")]
    except csv.Error as err:
        raise CsvProblem(f"data.root: {path} is not a CSV list ({err}); write rows of "
                         "path,label") from None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] in (["path", "label"],
                                                                 ["path", "labels"]):
        rows = rows[1:]
    short = [n for n, r in rows if len(r) < 2]
    no_path = [n for n, r in rows if len(r) >= 2 and not r[0].strip()]
    no_label = [] if allow_empty_label else [n for n, r in rows
                                             if len(r) >= 2 and not r[1].strip()]
    if not rows or short or no_path or no_label:
        found = [f"{what} on line{'s' if len(lines) > 1 else ''} "
                 f"{', '.join(map(str, lines[:5]))}{' ...' if len(lines) > 5 else ''}"
                 for what, lines in (("fewer than two fields", short), ("no path", no_path),
                                     ("an empty label", no_label)) if lines]
        raise CsvProblem(f"data.root: {path} needs rows of path,label; "
                         + ("; ".join(found) if found else "it has none")
                         + " (fix or remove those rows)" * bool(found))
    return [(r[0].strip(), r[1].strip()) for _, r in rows]


class Csv(DataFormat):
    """A CSV of path,label rows (paths relative to the CSV)."""

    name = "csv"
    needs_root = True

    def class_names(self, cfg: Any) -> list[str] | None:
        given = super().class_names(cfg)
        path = Path(str(cfg.root)).expanduser()
        if given or self.problems(cfg) or not path.is_file():
            return given
        try:
            return sorted({label for _, label in read_csv_rows(path)})
        except CsvProblem:
            return None  # reading the data says what is wrong, with the rest

    label_sets = "path,a;b;c"  # the second column: labels separated by ;

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        from finetune.data import check_root, read_csv_list

        full, names = read_csv_list(check_root(cfg.root, self.name), cfg.classes)
        return full, None, names

    def read_label_sets(self, cfg: Any) -> tuple[Any, list[str]]:
        from finetune.data import check_root, read_multilabel_csv

        return read_multilabel_csv(check_root(cfg.root, self.name))


class ImageFolder(DataFormat):
    """root/<class>/<image>, or root/train/<class>/... and root/val/<class>/..."""

    name = "imagefolder"
    needs_root = True

    def class_names(self, cfg: Any) -> list[str] | None:
        given = super().class_names(cfg)
        if given or self.problems(cfg):
            return given
        root = Path(str(cfg.root)).expanduser()
        folder = root / "train" if (root / "train").is_dir() and (root / "val").is_dir() \
            else root
        if not folder.is_dir():
            return None
        return sorted(p.name for p in folder.iterdir()
                      if p.is_dir() and not p.name.startswith(".")) or None

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        from finetune.data import check_root, scan_folder

        root = check_root(cfg.root, self.name)
        if (root / "train").is_dir() and (root / "val").is_dir():
            full, names = scan_folder(root / "train", cfg.classes)
            val, _ = scan_folder(root / "val", names)
            return full, val, names
        full, names = scan_folder(root, cfg.classes)
        return full, None, names


FORMATS: dict[str, DataFormat] = {f.name: f for f in (Digits(), ImageFolder(), Csv(), Fake())}
