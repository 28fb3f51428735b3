"""The data formats of masks (`task: segmentation`), entries of the same `FORMATS` table as
the class-label and box formats: image folders with a mask PNG per image (`mask_folders`),
Pascal VOC's SegmentationClass (`voc_masks`), and the digits pasted onto canvases with their
inked pixels as masks (`digit_masks`: offline, for the recipes and tests).

Every problem of the masks is found before anything trains (finetune/data/masks.py).
Torch-free: `data.name` choices and the early checks run without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.box_formats import DigitCanvases
from finetune.data.formats import FORMATS, DataFormat

BACKGROUND = "background"  # digit_masks: class 0, every pixel no digit inked


class MaskFolder(DataFormat):
    """An image folder and a mask folder under data.root (finetune/data/masks.py LAYOUTS)."""

    needs_root = True
    holds = "masks"

    def read_masks(self, cfg: Any) -> Any:
        """The image/mask pairs and the class table (a MaskSet; its problems are the
        pre-flight check's to say)."""
        # lazy: the readers' PIL and numpy stay off the config-only commands' start-up
        from finetune.data.masks import read_mask_folder

        given = [str(c) for c in cfg.classes] if cfg.get("classes") else None
        return read_mask_folder(Path(str(cfg.root)).expanduser(), self.name, given,
                                bool(cfg.get("follow_links")))


class MaskFolders(MaskFolder):
    name = "mask_folders"  # root/images/<name>.<ext> + root/masks/<name>.png


class VocMasks(MaskFolder):
    name = "voc_masks"  # root/JPEGImages + root/SegmentationClass (VOC's 21 classes)


class DigitMasks(DigitCanvases):
    """digit_canvases with a mask per canvas: each digit's inked pixels its class, the rest
    the background (class 0)."""

    name = "digit_masks"
    holds = "masks"

    def class_names(self, cfg: Any) -> list[str] | None:
        return [BACKGROUND, *(DigitCanvases.class_names(self, cfg) or [])]


FORMATS.add(MaskFolders(), VocMasks(), DigitMasks())
