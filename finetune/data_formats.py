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


class Digits(DataFormat):
    """scikit-learn's 1,797 8x8 digits, in memory."""

    name = "digits"

    def class_names(self, cfg: Any) -> list[str] | None:
        return super().class_names(cfg) or [str(d) for d in range(10)]

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        from finetune.data import load_digits

        full, names = load_digits(cfg.classes)
        return full, None, names


class Fake(DataFormat):
    """Random uint8 images, for smoke tests and benchmarks."""

    name = "fake"

    def class_names(self, cfg: Any) -> list[str] | None:
        return [str(i) for i in range(cfg.fake_classes)]

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        from finetune.data import fake_data

        full, names = fake_data(cfg.fake_size, cfg.fake_classes, crop, seed)
        return full, None, names


class Csv(DataFormat):
    """A CSV of path,label rows (paths relative to the CSV)."""

    name = "csv"
    needs_root = True

    def class_names(self, cfg: Any) -> list[str] | None:
        import csv

        given = super().class_names(cfg)
        path = Path(str(cfg.root)).expanduser()
        if given or self.problems(cfg) or not path.is_file() or path.stat().st_size > 2**26:
            return given
        with open(path, newline="", errors="replace") as handle:
            rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
        if rows and rows[0][:2] == ["path", "label"]:
            rows = rows[1:]  # the optional header
        return sorted({r[1] for r in rows if len(r) > 1}) or None

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        from finetune.data import check_root, read_csv_list

        full, names = read_csv_list(check_root(cfg.root, self.name), cfg.classes)
        return full, None, names


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
