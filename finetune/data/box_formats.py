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

from finetune.data.boxes import READERS, BoxSet
from finetune.data.formats import FORMATS, DataFormat

# What data=digit_canvases draws its training canvases from: each digit's first images; its
# validation canvases use the rest (digits never seen in training).
CANVAS_TRAIN_IMAGES = 130


class BoxFormat(DataFormat):
    """Annotation files under data.root; every image they name must lie inside it."""

    needs_root = True
    holds = "boxes"
    layout = ""  # what data.root names, for the docs and messages

    def class_names(self, cfg: Any) -> list[str] | None:
        return super().class_names(cfg)  # the files' names are known when they are read

    def read_boxes(self, cfg: Any) -> tuple[BoxSet, BoxSet | None]:
        """(the labelled boxes, a validation set of its own or None)."""
        root = Path(str(cfg.root)).expanduser()
        follow = bool(cfg.get("follow_links"))
        if self.name == "box_csv":
            return READERS[self.name](root, cfg.box_format, follow), None
        return READERS[self.name](root, follow), None


class BoxCsv(BoxFormat):
    name = "box_csv"
    layout = "a CSV file of path,x1,y1,x2,y2,label rows (data.box_format: xyxy | xywh | cxcywh)"


class Coco(BoxFormat):
    name = "coco"
    layout = "a COCO instances JSON file (images beside it or in its images/ folder)"


class Voc(BoxFormat):
    name = "voc"
    layout = "a Pascal VOC folder (Annotations/*.xml, JPEGImages/)"


class Yolo(BoxFormat):
    name = "yolo"
    layout = "a YOLO folder (images/, labels/, data.yaml or classes.txt)"


class DigitCanvases(DataFormat):
    """scikit-learn's digits pasted onto black canvases (finetune/data/canvases.py), in
    memory: data.canvases says how many, how large, how many digits each."""

    name = "digit_canvases"
    holds = "boxes"

    def class_names(self, cfg: Any) -> list[str] | None:
        return super().class_names(cfg) or [str(d) for d in range(10)]

    def canvases(self, cfg: Any, seed: int, val_fraction: float) -> tuple[list[Any], list[Any]]:
        """(training canvases, validation canvases): the validation ones from other images
        of each digit than the training ones."""
        # lazy: keeps scikit-learn's import off the torch-free paths that only check names
        from finetune.data.canvases import digit_canvases

        spec = cfg.canvases
        digits = [int(c) for c in self.class_names(cfg) or []]
        val_count = max(1, round(spec.count * val_fraction))
        common = {"size": spec.size, "digits": digits, "per_canvas": (1, spec.per_canvas),
                  "scales": tuple(spec.scales)}
        train = digit_canvases(spec.count - val_count, seed=seed, stop=CANVAS_TRAIN_IMAGES,
                               **common)
        val = digit_canvases(val_count, seed=seed + 1, start=CANVAS_TRAIN_IMAGES, **common)
        return train, val


FORMATS.add(BoxCsv(), Coco(), Voc(), Yolo(), DigitCanvases())
