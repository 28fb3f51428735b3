"""The label pre-flight check of box data: before anything trains, every problem at once —
what a reader could not read, class ids and names the classes do not have, head.num_classes
against the data, image files missing or not images, sizes that differ from the annotation,
boxes outside their image or of no area, four numbers that look like another box format than
the one declared, images without boxes where they are refused, and — for instance masks —
objects without a segmentation, segmentations that do not fit their image, and empty masks.
Each problem is one sentence with a count and a first example. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from finetune.data.boxes import Box, BoxedImage, BoxSet, image_size
from finetune.data.instance_masks import MaskShapeError, decode

# A box may reach this many pixels past the image's edge (annotation tools round outward).
EDGE_TOLERANCE = 1.0
# The share of boxes that must be impossible in the declared format before another is
# suggested (a few bad rows are bad rows, not a format).
FORMAT_EVIDENCE = 0.1
EMPTY_POLICIES = ("keep", "refuse")  # images without boxes: negatives, or a mistake


@dataclass(frozen=True)
class Checked:
    """The problems found and each image's size read from its file (None: not an image)."""

    problems: list[str]
    sizes: dict[str, tuple[int, int] | None]


def _counted(items: list[str], what: str, advice: str) -> list[str]:
    if not items:
        return []
    return [f"{len(items)} {what}, e.g. {items[0]}; {advice}"]


def _fits(x1: float, y1: float, x2: float, y2: float, size: tuple[int, int]) -> bool:
    return (x2 > x1 and y2 > y1 and x1 >= -EDGE_TOLERANCE and y1 >= -EDGE_TOLERANCE
            and x2 <= size[0] + EDGE_TOLERANCE and y2 <= size[1] + EDGE_TOLERANCE)


def format_problem(boxes: list[tuple[Box, tuple[int, int]]], declared: str) -> str | None:
    """When the boxes are impossible as `declared` (xyxy or xywh) but all fit their images
    read the other way, one sentence saying so (None otherwise)."""
    if declared not in ("xyxy", "xywh") or not boxes:
        return None
    other = "xywh" if declared == "xyxy" else "xyxy"
    # the four numbers as written, read the other way
    if declared == "xyxy":
        as_other = [(b.x1, b.y1, b.x1 + b.x2, b.y1 + b.y2) for b, _ in boxes]
    else:
        as_other = [(b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1) for b, _ in boxes]
    wrong = sum(not _fits(b.x1, b.y1, b.x2, b.y2, size) for b, size in boxes)
    right = sum(_fits(*o, size) for o, (_, size) in zip(as_other, boxes, strict=True))
    if wrong < max(1, FORMAT_EVIDENCE * len(boxes)) or right < len(boxes):
        return None
    words = {"xyxy": "x1,y1,x2,y2", "xywh": "x,y,w,h"}
    return (f"the boxes look like {words[other]}, not the declared {words[declared]}: "
            f"{wrong} of {len(boxes)} do not fit their image as {words[declared]}, and every "
            f"one fits as {words[other]}; set data.box_format={other}")


def check_boxes(found: BoxSet, *, classes: list[str] | None = None,
                num_classes: int | None = None, empty: str = "keep",
                box_format: str | None = None, masks: bool = False) -> Checked:
    """Every problem of `found` at once (see the module's docstring).

    `classes`: data.classes when given (the names a run trains; a box of another class is a
    problem); `num_classes`: head.num_classes when set (the object classes, background not
    counted); `empty`: what images without boxes are (keep: negatives, refuse: a problem);
    `box_format`: the format a CSV declared (its four numbers are checked against the other);
    `masks`: every object needs a segmentation that is a mask of its image (instance masks).
    """
    problems = list(found.problems)
    names = [str(c) for c in classes] if classes else found.classes
    for class_id, where in found.unknown_ids.items():
        problems.append(f"{len(where)} box(es) have class id {class_id}, which names no class "
                        f"(the classes: {', '.join(found.classes[:12]) or 'none'}), e.g. "
                        f"{where[0]}; fix the id or add the class")
    unknown: dict[str, list[str]] = {}
    for image in found.images:
        for box in image.boxes:
            if box.label not in names:
                unknown.setdefault(box.label, []).append(box.where)
    for label, where in sorted(unknown.items()):
        problems.append(f"{len(where)} box(es) of class {label!r}, which data.classes does not "
                        f"list ({', '.join(names[:12])}), e.g. {where[0]}; add it to "
                        "data.classes or remove those boxes")
    if num_classes is not None and num_classes != len(names):
        problems.append(f"head.num_classes={num_classes}, but the data has {len(names)} "
                        f"object classes ({', '.join(names[:12])}); the background is not a "
                        "class here (finetune adds it): set head.num_classes="
                        f"{len(names)} or leave it out")
    sizes: dict[str, tuple[int, int] | None] = {}
    missing, broken, resized = [], [], []
    for image in found.images:
        if not image.path.is_file():
            missing.append(str(image.path))
            continue
        size = sizes[str(image.path)] = image_size(image.path)
        if size is None:
            broken.append(str(image.path))
        elif image.stated_size and tuple(image.stated_size) != size:
            resized.append(f"{image.path.name} (stated {image.stated_size[0]}x"
                           f"{image.stated_size[1]}, the file {size[0]}x{size[1]})")
    problems += _counted(missing, "image file(s) the annotations name do not exist",
                         "fix the paths or remove their entries")
    problems += _counted(broken, "file(s) the annotations name are not images",
                         "replace or remove them")
    problems += _counted(resized, "image(s) differ in size from their annotation",
                         "the boxes were drawn on another version of the image")
    problems += _box_problems(found.images, sizes, box_format)
    if masks:
        problems += mask_problems(found.images, sizes)
    negatives = [str(i.path.name) for i in found.images if not i.boxes]
    if found.images and len(negatives) == len(found.images):
        problems.append(f"none of the {len(found.images)} images has a box; the annotations "
                        "were not found where the data format reads them")
    elif negatives and empty == "refuse":
        problems += _counted(negatives, "image(s) have no boxes",
                             "data.empty_images=keep trains on them as negatives (nothing "
                             "to find), or annotate them")
    return Checked(problems, sizes)


def _box_problems(images: Iterable[BoxedImage], sizes: dict[str, tuple[int, int] | None],
                  box_format: str | None) -> list[str]:
    flat = [(box, size) for image in images for box in image.boxes
            if (size := sizes.get(str(image.path)))]
    guess = format_problem(flat, box_format) if box_format else None
    if guess:
        return [guess]  # the rest follows from the format
    empty = [f"{b.where} ({b.x1:g},{b.y1:g},{b.x2:g},{b.y2:g})" for b, _ in flat
             if not (b.x2 > b.x1 and b.y2 > b.y1)]
    outside = [f"{b.where} ({b.x1:g},{b.y1:g},{b.x2:g},{b.y2:g} in {s[0]}x{s[1]})"
               for b, s in flat if b.x2 > b.x1 and b.y2 > b.y1 and not _fits(
                   b.x1, b.y1, b.x2, b.y2, s)]
    return [*_counted(empty, "box(es) have no area (x2 <= x1 or y2 <= y1)",
                      "fix or remove them"),
            *_counted(outside, "box(es) reach outside their image",
                      f"fix them (a box may reach {EDGE_TOLERANCE:g} pixel past an edge)")]


def mask_problems(images: Iterable[BoxedImage], sizes: dict[str, tuple[int, int] | None]
                  ) -> list[str]:
    """Objects whose segmentation is missing, cannot be read as a mask of their image, or
    covers no pixel (each decoded once, at the image file's size)."""
    missing, unreadable, empty = [], [], []
    for image in images:
        size = sizes.get(str(image.path))
        if size is None:
            continue  # the image itself is a problem already
        for box in image.boxes:
            if box.shape is None or box.shape == []:
                missing.append(box.where)
                continue
            try:
                mask = decode(box.shape, size[1], size[0])
            except MaskShapeError as err:
                unreadable.append(f"{box.where} ({err})")
                continue
            if not mask.any():
                empty.append(box.where)
    return [*_counted(missing, "object(s) have no segmentation (polygons or RLE)",
                      "an instance mask needs one per object: add it, or train task=detection "
                      "on the boxes alone"),
            *_counted(unreadable, "segmentation(s) cannot be read as masks of their image",
                      "fix or remove them"),
            *_counted(empty, "segmentation(s) cover no pixel", "fix or remove them")]
