"""Instance masks as COCO writes them, read without COCO's C decoder: polygons, uncompressed
RLE and compressed RLE strings each decode to the pixels COCO's own library gives, RLE written
back round-trips, and every way a received segmentation can be wrong is one sentence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from faster_coco_eval.core import mask as coco_mask

from finetune.data.instance_masks import MaskShapeError, canvas_instances, decode, encode


def _random_mask(height: int, width: int, seed: int, first: bool) -> np.ndarray:
    mask = np.random.default_rng(seed).random((height, width)) > 0.6
    mask[0, 0] = first  # COCO's runs start with background: both starts are cases
    return mask


def _coco_string(mask: np.ndarray) -> str:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


@pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 7), (40, 33), (64, 64)])
@pytest.mark.parametrize("first", [True, False])
def test_rle_in_both_forms_decodes_to_cocos_pixels_and_round_trips(
        height: int, width: int, first: bool) -> None:
    mask = _random_mask(height, width, height * width, first)
    compressed = {"size": [height, width], "counts": _coco_string(mask)}
    assert np.array_equal(decode(compressed, height, width), mask)
    written = encode(mask)
    assert written["size"] == [height, width] and sum(written["counts"]) == height * width
    assert np.array_equal(decode(written, height, width), mask)
    # the same runs COCO's own encoder counts
    reference = coco_mask.frPyObjects(written, height, width)
    assert _coco_string(coco_mask.decode(reference).astype(bool)) == compressed["counts"]


def test_polygons_fill_what_cocos_rasterizer_fills_but_the_edge() -> None:
    """Two polygons of one object (a ring's outer parts): Pillow fills them with their
    boundary pixels, COCO's rasterizer without the far edge: they differ only there."""
    polygons = [[2, 2, 20, 2, 20, 15, 2, 15], [25, 25, 35, 25, 30, 35]]
    mine = decode(polygons, 40, 40)
    theirs = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, 40, 40))
                              ).astype(bool)
    assert not (theirs & ~mine).any()  # nothing COCO fills is missing
    extra = mine & ~theirs
    rows, cols = np.nonzero(extra)
    on_an_edge = [mine[r, c] and not (mine[r + 1, c] and mine[r, c + 1]) for r, c in
                  zip(rows, cols, strict=True)]
    assert all(on_an_edge) and extra.sum() < 0.2 * theirs.sum()


@pytest.mark.parametrize(("segmentation", "said"), [
    (None, "has no segmentation"),
    ([], "has no segmentation"),
    ("0", "has no segmentation"),
    ({"counts": [0, 12]}, "no size"),
    ({"size": [3, 5], "counts": [15]}, "is 3x5 (height x width) but the image is 4x5"),
    ({"size": [4, 5], "counts": [10, 5]}, "cover 15 pixels, not the image's 20"),
    ({"size": [4, 5], "counts": [30, -10]}, "negative count"),
    ({"size": [4, 5], "counts": [10.5, 9.5]}, "neither a list of whole numbers"),
    ({"size": [4, 5], "counts": {"a": 1}}, "neither a list of whole numbers"),
    ({"size": [4, 5], "counts": "0~"}, "does not use"),
    ({"size": [4, 5], "counts": "o"}, "ends inside a count"),
    ({"size": [4, 5], "counts": "ooooooooo0"}, "too long"),
    ({"size": [4, 5], "counts": "a1"}, "not the image's 20"),
    ([[0, 0, 4, 0]], "at least three x,y pairs"),
    ([[0, 0, 4, 0, 4, 3, 1]], "at least three x,y pairs"),
    ([[0, 0, 4, "0", 4, 3]], "at least three x,y pairs"),
    ([[0, 0, 4, 0, 4, True]], "at least three x,y pairs"),
    ([[0, 0, 4000, 0, 4, 3]], "reaches outside its 5x4 image"),
    ([[0, -9, 4, 0, 4, 3]], "reaches outside its 5x4 image"),
    (["not a polygon"], "at least three x,y pairs"),
])
def test_every_broken_segmentation_is_one_sentence(segmentation: Any, said: str) -> None:
    with pytest.raises(MaskShapeError) as caught:
        decode(segmentation, 4, 5)
    assert said in str(caught.value)


def test_a_polygon_may_reach_a_rounded_pixel_past_the_edge() -> None:
    mask = decode([[-1.5, -1, 6.5, -1, 6.5, 5.5, -1.5, 5.5]], 4, 5)
    assert mask.all()


def test_a_canvas_digit_is_its_inked_pixels_inside_its_box() -> None:
    pixels = np.zeros((10, 12), dtype=np.uint8)
    pixels[1:4, 2:5] = [[200, 0, 70], [63, 64, 255], [0, 0, 90]]
    pixels[6:9, 8:11] = 255
    first, second = canvas_instances(pixels, [(2, 1, 5, 4, "3"), (8, 6, 11, 9, "7")])
    assert np.array_equal(np.argwhere(first), [[1, 2], [1, 4], [2, 3], [2, 4], [3, 4]])
    assert second.sum() == 9 and not (first & second).any()
