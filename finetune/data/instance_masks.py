"""Instance masks as COCO writes them — polygons, run-length encoding (RLE) as a list of counts,
or RLE compressed into a string — read into one boolean (height, width) array per object,
and written back as uncompressed RLE (what predict puts in its JSON).

An annotation file is untrusted: its counts are checked to cover the image exactly (COCO's own
C decoder writes past its buffer when they do not), its polygons to be numbers inside a
bounded canvas, and every failure is a sentence (`MaskShapeError`) for the pre-flight check.
Everything here is numpy and Pillow: no C decoder reads received data. Nothing imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from finetune.data.masks import INK

# A polygon may reach this many pixels past the image (annotation tools round outward);
# coordinates farther out are a broken file, not a shape.
POLYGON_SLACK = 2.0


class MaskShapeError(ValueError):
    """A segmentation that cannot be read as a mask of its image (the message says why)."""


def _string_counts(text: str) -> list[int]:
    """COCO's compressed RLE string as its counts (maskApi.c's rleFrString: six bits a
    character, 5 of value and a continuation bit, each count after the second a difference
    to the one two before)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise MaskShapeError("its RLE string ends inside a count")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise MaskShapeError(f"its RLE string has a character ({text[p]!r}) COCO's "
                                     "encoding does not use")
            value |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if k > 7:
                raise MaskShapeError("its RLE string has a count too long for any image")
            if not more and c & 0x10:
                value |= -1 << (5 * k)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _rle_mask(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int)
                                                              for s in size)):
        raise MaskShapeError("its RLE has no size [height, width]")
    if tuple(size) != (height, width):
        raise MaskShapeError(f"its RLE is {size[0]}x{size[1]} (height x width) but the image "
                             f"is {height}x{width}")
    counts = rle.get("counts")
    if isinstance(counts, str | bytes):
        counts = _string_counts(counts.decode("ascii", "replace") if isinstance(counts, bytes)
                                else counts)
    if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                               for c in counts):
        raise MaskShapeError("its RLE counts are neither a list of whole numbers nor a "
                             "COCO string")
    if any(c < 0 for c in counts):
        raise MaskShapeError("its RLE has a negative count")
    if sum(counts) != height * width:
        raise MaskShapeError(f"its RLE counts cover {sum(counts)} pixels, not the image's "
                             f"{height * width}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # COCO's runs start with background
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T  # COCO runs go down the columns


def _polygon_mask(polygons: list[Any], height: int, width: int) -> np.ndarray:
    canvas = Image.new("1", (width, height), 0)
    pen = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in polygon):
            raise MaskShapeError("a polygon is not a list of at least three x,y pairs of "
                                 "numbers")
        xs, ys = polygon[0::2], polygon[1::2]
        if not all(-POLYGON_SLACK <= x <= width + POLYGON_SLACK for x in xs) or not all(
                -POLYGON_SLACK <= y <= height + POLYGON_SLACK for y in ys):
            raise MaskShapeError(f"a polygon reaches outside its {width}x{height} image")
        # Pillow counts the boundary pixels in; COCO's own rasterizer may differ there by one
        pen.polygon(list(zip(xs, ys, strict=True)), fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO annotation's `segmentation` as a (height, width) boolean mask of its image.

    Raises:
        MaskShapeError: it is missing, not one of COCO's three forms, or does not fit the
            image.
    """
    if isinstance(segmentation, dict):
        return _rle_mask(segmentation, height, width)
    if isinstance(segmentation, list) and segmentation:
        return _polygon_mask(segmentation, height, width)
    raise MaskShapeError("it has no segmentation (polygons, or RLE with size and counts)")


def encode(mask: np.ndarray) -> dict[str, Any]:
    """A boolean (height, width) mask as COCO's uncompressed RLE: {"size": [h, w], "counts":
    [background run, object run, ...]} down the columns."""
    height, width = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(height), int(width)], "counts": [int(c) for c in counts]}


def canvas_instances(pixels: np.ndarray, boxes: list[tuple[int, int, int, int, str]]
                     ) -> list[np.ndarray]:
    """A digit canvas's objects as masks: each digit's inked pixels inside its box (the digits
    of a canvas never touch)."""
    masks = []
    for x1, y1, x2, y2, _ in boxes:
        mask = np.zeros(pixels.shape, dtype=bool)
        mask[y1:y2, x1:x2] = pixels[y1:y2, x1:x2] >= INK
        masks.append(mask)
    return masks
