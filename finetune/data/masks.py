"""Masks as received data (task=segmentation), and their pre-flight check: an image folder
with a mask PNG per image — palette PNGs (mode P: the palette index is the class id) or grey
ones (mode L or I;16: the grey value is the class id) — read into pairs, and before anything
trains every problem at once: images without a mask, masks that are colour pictures (RGB)
rather than ids, masks whose size differs from their image, ids the class table does not
have, masks with no labelled pixel. Each problem is one sentence with a count and a first
example. Paths stay inside the data root unless data.follow_links says otherwise.

Layouts: `mask_folders` (root/images/<name>.<ext>, root/masks/<name>.png, the class table in
data.classes or root/classes.txt) and `voc_masks` (Pascal VOC: root/JPEGImages/<name>.jpg,
root/SegmentationClass/<name>.png, VOC's 21 classes, 255 on the object borders). Nothing here
imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.compose.safe_files import read_text
from finetune.data.images import IMAGE_SUFFIXES
from finetune.locations import inside

# Pascal VOC's segmentation classes, in id order (0 is the background; 255 marks borders).
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
LAYOUTS = {"mask_folders": ("images", "masks"), "voc_masks": ("JPEGImages", "SegmentationClass")}
MASK_MODES = ("P", "L", "I;16", "I")  # ids as palette indices or grey values
MAX_CLASS_FILE_BYTES = 1 << 20
# A canvas pixel at least this bright belongs to the digit drawn there (the ink's edge is
# faint: the 8x8 digits hold 0-16, scaled to 0-255).
INK = 64


@dataclass(frozen=True)
class MaskPair:
    image: Path
    mask: Path


@dataclass
class MaskSet:
    """Pairs read from a data root, the class names (None: not known) and what is wrong."""

    pairs: list[MaskPair]
    classes: list[str] | None
    problems: list[str] = field(default_factory=list)


def _counted(found: list[str], what: str, advice: str) -> list[str]:
    return [f"{len(found)} {what}, e.g. {found[0]}; {advice}"] if found else []


def class_table(root: Path, layout: str, given: list[str] | None, follow_links: bool
                ) -> tuple[list[str] | None, list[str]]:
    """(class names in id order, problems): data.classes, else root/classes.txt (one name
    per line), else VOC's for voc_masks."""
    if given:
        return given, []
    listed = root / "classes.txt"
    if listed.is_file():
        if not follow_links and not inside(listed, root):
            return None, [f"data.root: {listed} lies outside {root.resolve()} (a symbolic "
                          "link); a data folder may use only its own files"]
        names = [line.strip() for line in read_text(listed, MAX_CLASS_FILE_BYTES,
                                                    "data.root:").splitlines() if line.strip()]
        return names, [] if len(names) >= 2 else [
            f"data.root: {listed} names {len(names)} class(es); a mask needs two at least "
            "(the background counts: name it first)"]
    if layout == "voc_masks":
        return list(VOC_CLASSES), []
    return None, [f"data.root: {root} has no classes.txt and data.classes is not set; name "
                  "the classes in id order (the mask value 0 is the first name, usually "
                  "background), e.g. data.classes=[background,cat,dog]"]


def read_mask_folder(root: Path, layout: str, given: list[str] | None = None,
                     follow_links: bool = False) -> MaskSet:
    """The image/mask pairs of a `layout` folder under `root` (its problems collected)."""
    images_dir, masks_dir = (root / part for part in LAYOUTS[layout])
    classes, problems = class_table(root, layout, given, follow_links)
    if layout == "voc_masks":  # JPEGImages holds every VOC image; the masks say which
        return _voc_pairs(root, images_dir, masks_dir, classes, problems, follow_links)
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if images_dir.is_dir() else []
    if not files:
        return MaskSet([], classes, [*problems, f"data.root: {images_dir} holds no images"])
    pairs, missing, outside = [], [], []
    for file in files:
        mask = masks_dir / file.relative_to(images_dir).with_suffix(".png")
        if not follow_links and not (inside(file, root) and inside(mask, root)):
            outside.append(str(file if not inside(file, root) else mask))
        elif not mask.is_file():
            missing.append(file.relative_to(root).as_posix())
        else:
            pairs.append(MaskPair(file, mask))
    problems += _counted(missing, f"image(s) without a mask in {masks_dir.name}/",
                         f"give each image a {masks_dir.name}/<same name>.png or remove it")
    problems += _counted(outside, f"file(s) outside {root.resolve()} (a symbolic link)",
                         "a data folder may use only its own files (data.follow_links=true "
                         "on the command line if you trust where they point)")
    return MaskSet(pairs, classes, problems)


def _voc_pairs(root: Path, images_dir: Path, masks_dir: Path, classes: list[str] | None,
               problems: list[str], follow_links: bool) -> MaskSet:
    masks = sorted(masks_dir.glob("*.png")) if masks_dir.is_dir() else []
    if not masks:
        return MaskSet([], classes, [*problems, f"data.root: {masks_dir} holds no masks"])
    pairs, missing, outside = [], [], []
    for mask in masks:
        image = images_dir / f"{mask.stem}.jpg"
        if not follow_links and not (inside(image, root) and inside(mask, root)):
            outside.append(str(mask if not inside(mask, root) else image))
        elif not image.is_file():
            missing.append(mask.name)
        else:
            pairs.append(MaskPair(image, mask))
    problems += _counted(missing, f"mask(s) without an image in {images_dir.name}/",
                         f"give each mask a {images_dir.name}/<same name>.jpg or remove it")
    problems += _counted(outside, f"file(s) outside {root.resolve()} (a symbolic link)",
                         "a data folder may use only its own files (data.follow_links=true "
                         "on the command line if you trust where they point)")
    return MaskSet(pairs, classes, problems)


def mask_ids(path: Path) -> np.ndarray:
    """A mask file's ids (height, width); ValueError: not a mask of ids (an RGB picture)."""
    with Image.open(path) as image:
        if image.mode not in MASK_MODES:
            raise ValueError(image.mode)
        return np.asarray(image).astype(np.int64)


def check_masks(found: MaskSet, ignore_index: int, num_classes: int | None) -> list[str]:
    """Every problem of the pairs, at once (the reader's first)."""
    problems = list(found.problems)
    classes = found.classes
    if classes is not None and num_classes is not None and num_classes != len(classes):
        problems.append(f"head.num_classes={num_classes}, but the class table names "
                        f"{len(classes)} classes ({', '.join(classes[:6])}"
                        f"{', ...' if len(classes) > 6 else ''}); set head.num_classes="
                        f"{len(classes)} or leave it out")
    colour, unreadable, sizes, empty = [], [], [], []
    unknown: dict[int, list[str]] = {}
    for pair in found.pairs:
        name = pair.mask.name
        try:
            ids = mask_ids(pair.mask)
        except ValueError as err:
            colour.append(f"{name} ({err})")
            continue
        except (OSError, Image.DecompressionBombError):  # (a bomb: too many pixels)
            unreadable.append(name)
            continue
        try:
            with Image.open(pair.image) as image:
                size = image.size
        except (OSError, Image.DecompressionBombError):  # (a bomb: too many pixels)
            unreadable.append(pair.image.name)
            continue
        if size != (ids.shape[1], ids.shape[0]):
            sizes.append(f"{name} is {ids.shape[1]}x{ids.shape[0]}, its image {size[0]}x"
                         f"{size[1]}")
        labelled = ids[ids != ignore_index]
        if labelled.size == 0:
            empty.append(name)
        elif classes is not None:
            for value in np.unique(labelled[(labelled < 0) | (labelled >= len(classes))]):
                unknown.setdefault(int(value), []).append(name)
    problems += _counted(unreadable, "file(s) that cannot be read as images",
                         "replace or remove them")
    problems += _counted(colour, "mask(s) that are colour pictures, not class ids",
                         "save each mask as a palette PNG (mode P) or a grey PNG whose values "
                         "are the class ids")
    problems += _counted(sizes, "mask(s) of another size than their image",
                         "a mask gives one id per pixel of its image: resize it (nearest) or "
                         "fix the pairing")
    problems += _counted(empty, f"mask(s) with no labelled pixel (all {ignore_index})",
                         "label them or remove the pairs (data.ignore_index says which value "
                         "marks unlabelled pixels)")
    if unknown and classes is not None:
        first, names = next(iter(sorted(unknown.items())))
        masks = len({n for found_in in unknown.values() for n in found_in})
        problems.append(f"mask id(s) {', '.join(map(str, sorted(unknown)))} are not classes "
                        f"(the class table has ids 0-{len(classes) - 1}) in {masks} "
                        f"mask(s), e.g. {first} in {names[0]}; add the classes to data.classes "
                        f"(or classes.txt), or set data.ignore_index={first} if that value "
                        "marks unlabelled pixels")
    return problems


def canvas_mask(pixels: np.ndarray, boxes: list[tuple[int, int, int, int, str]],
                names: list[str]) -> np.ndarray:
    """A digit canvas's mask (its pixels and boxes, finetune/data/canvases.py): each digit's
    inked pixels get its class (its place in `names`, whose first is the background); every
    other pixel the background, 0."""
    mask = np.zeros(pixels.shape, dtype=np.int64)
    index = {n: i for i, n in enumerate(names)}
    for x1, y1, x2, y2, digit in boxes:
        region = pixels[y1:y2, x1:x2] >= INK
        mask[y1:y2, x1:x2][region] = index[digit]
    return mask
