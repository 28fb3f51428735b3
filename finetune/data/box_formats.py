"""The data formats of boxes (`task: detection`), entries of the same `FORMATS` table as the
class-label formats: COCO JSON, Pascal VOC XML, YOLO txt, a `path,x1,y1,x2,y2,label` CSV,
and the digits pasted onto canvases (offline, for the quickstart and tests).

Each reads its annotations into one form (finetune/data/boxes.py) and every problem of them
is found before anything trains (finetune/data/box_checks.py). Torch-free: `data.name`
choices and the early checks run without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.formats import FORMATS, DataFormat

# What data=digit_canvases draws its training canvases from: each digit's first images; its
# validation canvases use the rest (digits never seen in training).
CANVAS_TRAIN_IMAGES = 130
CANVAS_PIXELS = 2**30  # the most canvas pixels (bytes) data=digit_canvases makes


class BoxFormat(DataFormat):
    """Annotation files under data.root (every image they name must lie inside it), read by
    the reader of the same name in finetune/data/boxes.py."""

    needs_root = True
    holds = "boxes"

    def read_boxes(self, cfg: Any) -> Any:
        """The labelled boxes (a BoxSet; its problems are the pre-flight check's to say)."""
        # lazy: the readers' PIL and numpy stay off the config-only commands' start-up
        from finetune.data.boxes import READERS

        return READERS[self.name](Path(str(cfg.root)).expanduser(),
                                  bool(cfg.get("follow_links")))


class BoxCsv(BoxFormat):
    """path,x1,y1,x2,y2,label rows; the four numbers as data.box_format says."""

    name = "box_csv"

    def read_boxes(self, cfg: Any) -> Any:
        # lazy: the readers' PIL and numpy stay off the config-only commands' start-up
        from finetune.data.boxes import read_box_csv

        return read_box_csv(Path(str(cfg.root)).expanduser(), cfg.box_format,
                            bool(cfg.get("follow_links")))


class Coco(BoxFormat):
    name = "coco"  # an instances JSON file, images beside it or in its images/ folder
    instance_masks = True  # its `segmentation`: polygons or RLE


class Voc(BoxFormat):
    name = "voc"  # a folder with Annotations/*.xml and JPEGImages/


class Yolo(BoxFormat):
    name = "yolo"  # a folder with images/, labels/ and data.yaml or classes.txt


class DigitCanvases(DataFormat):
    """scikit-learn's digits pasted onto black canvases (finetune/data/canvases.py), in
    memory: data.canvases says how many, how large, how many digits each."""

    name = "digit_canvases"
    holds = "boxes"
    instance_masks = True  # each digit's inked pixels

    def class_names(self, cfg: Any) -> list[str] | None:
        return super().class_names(cfg) or [str(d) for d in range(10)]

    def problems(self, cfg: Any) -> list[str]:
        """Canvases a received recipe could make too many or too large to hold in memory."""
        spec = cfg.get("canvases")
        if spec is None or not all(isinstance(spec.get(k), int) for k in ("count", "size")):
            return []  # (their types and ranges are checked with every other key)
        pixels = spec.count * spec.size * spec.size
        if pixels <= CANVAS_PIXELS:
            return []
        return [f"data.canvases: {spec.count} canvases of {spec.size}x{spec.size} px are "
                f"{pixels / 2**30:.1f} GiB of pixels in memory; keep count x size x size "
                f"under {CANVAS_PIXELS / 2**30:g} GiB"]

    def canvases(self, cfg: Any, seed: int, val_fraction: float) -> tuple[list[Any], list[Any]]:
        """(training canvases, validation canvases): the validation ones from other images
        of each digit than the training ones."""
        # lazy: keeps scikit-learn's import off the torch-free paths that only check names
        from finetune.data.canvases import digit_canvases

        spec = cfg.canvases
        digits = [int(c) for c in DigitCanvases.class_names(self, cfg) or []]
        val_count = max(1, round(spec.count * val_fraction))
        common = {"size": spec.size, "digits": digits, "per_canvas": (1, spec.per_canvas),
                  "scales": tuple(spec.scales)}
        train = digit_canvases(spec.count - val_count, seed=seed, stop=CANVAS_TRAIN_IMAGES,
                               **common)
        val = digit_canvases(val_count, seed=seed + 1, start=CANVAS_TRAIN_IMAGES, **common)
        return train, val


FORMATS.add(BoxCsv(), Coco(), Voc(), Yolo(), DigitCanvases())
