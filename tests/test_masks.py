"""Mask data as received: image / mask folders and VOC's layout read into pairs, the class
table found, and the pre-flight check naming every problem at once (each case of each rule);
digit canvases' masks; the datamodule's transforms keep image and mask aligned, resize masks
by the nearest pixel and turn the data's unlabelled value into the task's IGNORED."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.canvases import digit_canvases
from finetune.data.mask_datamodule import MaskDataset, MaskItem, mask_transform
from finetune.data.masks import (
    INK,
    VOC_CLASSES,
    canvas_mask,
    check_masks,
    mask_ids,
    read_mask_folder,
)
from finetune.models.backbones import Preprocessing
from finetune.tasks.segmentation import IGNORED

CLASSES = ["background", "cat", "dog"]


def _pair(root: Path, name: str, ids: np.ndarray, mode: str = "P", image_size: tuple[int, int]
          | None = None, images: str = "images", masks: str = "masks", suffix: str = ".png"
          ) -> None:
    """An image (grey noise) and its mask (`ids` in `mode`: P palette, L grey, RGB colour)."""
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / masks).mkdir(parents=True, exist_ok=True)
    height, width = ids.shape
    w, h = image_size or (width, height)
    pixels = np.random.default_rng(len(name)).integers(0, 255, (h, w), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(root / images / f"{name}{suffix}")
    if mode == "RGB":
        Image.fromarray(np.stack([ids.astype(np.uint8)] * 3, -1), mode="RGB").save(
            root / masks / f"{name}.png")
        return
    mask = Image.fromarray(ids.astype(np.uint8), mode=mode)
    if mode == "P":
        mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    mask.save(root / masks / f"{name}.png")


def _ids(*values: int, size: int = 8) -> np.ndarray:
    ids = np.zeros((size, size), dtype=np.int64)
    for i, value in enumerate(values):
        ids[i, :] = value
    return ids


def test_palette_and_grey_masks_read_as_their_ids(tmp_path: Path) -> None:
    _pair(tmp_path, "a", _ids(1, 2, 255), mode="P")
    _pair(tmp_path, "b", _ids(2, 1), mode="L")
    found = read_mask_folder(tmp_path, "mask_folders", CLASSES)
    assert found.problems == [] and [p.image.name for p in found.pairs] == ["a.png", "b.png"]
    assert np.array_equal(mask_ids(found.pairs[0].mask), _ids(1, 2, 255))
    assert np.array_equal(mask_ids(found.pairs[1].mask), _ids(2, 1))
    assert check_masks(found, 255, None) == []


def test_sixteen_bit_grey_masks_hold_ids_past_255(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("L", (4, 2)).save(tmp_path / "images" / "a.png")
    ids = np.array([[0, 300, 300, 1], [2, 255, 299, 0]], dtype=np.uint16)
    Image.fromarray(ids).save(tmp_path / "masks" / "a.png")
    found = read_mask_folder(tmp_path, "mask_folders", [str(i) for i in range(301)])
    assert np.array_equal(mask_ids(found.pairs[0].mask), ids.astype(np.int64))
    assert check_masks(found, 255, None) == []


def test_the_class_table_comes_from_the_config_classes_txt_or_voc(tmp_path: Path) -> None:
    _pair(tmp_path, "a", _ids(1))
    assert read_mask_folder(tmp_path, "mask_folders", ["x", "y"]).classes == ["x", "y"]
    missing = read_mask_folder(tmp_path, "mask_folders")
    assert missing.classes is None and "no classes.txt and data.classes is not set" in \
        missing.problems[0]
    (tmp_path / "classes.txt").write_text("background\ncat\n\n")
    assert read_mask_folder(tmp_path, "mask_folders").classes == ["background", "cat"]
    (tmp_path / "classes.txt").write_text("background\n")
    assert "names 1 class(es)" in read_mask_folder(tmp_path, "mask_folders").problems[0]
    voc = tmp_path / "voc"
    _pair(voc, "2007_000032", _ids(1, 15, 255), images="JPEGImages",
          masks="SegmentationClass", suffix=".jpg")
    Image.new("L", (8, 8)).save(voc / "JPEGImages" / "2007_000001.jpg")  # no mask: not used
    found = read_mask_folder(voc, "voc_masks")
    assert found.classes == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert [p.image.name for p in found.pairs] == ["2007_000032.jpg"]
    assert check_masks(found, 255, None) == []


def test_every_problem_of_the_masks_is_named_at_once(tmp_path: Path) -> None:
    """Each rule of the pre-flight check, each with a count and an example, together."""
    _pair(tmp_path, "good", _ids(0, 1, 2))
    _pair(tmp_path, "colour", _ids(1), mode="RGB")
    _pair(tmp_path, "sized", _ids(1), image_size=(10, 8))
    _pair(tmp_path, "unknown", _ids(1, 7, 9))
    _pair(tmp_path, "empty", np.full((8, 8), 255))
    Image.new("L", (8, 8)).save(tmp_path / "images" / "lonely.png")  # no mask
    (tmp_path / "masks" / "broken.png").write_bytes(b"not a png")
    Image.new("L", (8, 8)).save(tmp_path / "images" / "broken.png")
    found = read_mask_folder(tmp_path, "mask_folders", CLASSES)
    problems = check_masks(found, 255, num_classes=5)
    text = "\n".join(problems)
    assert len(problems) == 7, problems
    assert "head.num_classes=5, but the class table names 3 classes" in text
    assert "1 image(s) without a mask in masks/, e.g. images/lonely.png" in text
    assert "1 file(s) that cannot be read as images, e.g. broken.png" in text
    assert "1 mask(s) that are colour pictures, not class ids, e.g. colour.png (RGB)" in text
    assert "1 mask(s) of another size than their image, e.g. sized.png is 8x8, its image " \
           "10x8" in text
    assert "1 mask(s) with no labelled pixel (all 255), e.g. empty.png" in text
    assert "mask id(s) 7, 9 are not classes (the class table has ids 0-2) in 1 mask(s), " \
           "e.g. 7 in unknown.png" in text
    # the unlabelled value is the data's: 255 there is an id the classes lack
    assert "mask id(s) 7, 9, 255" in "\n".join(check_masks(
        read_mask_folder(tmp_path, "mask_folders", CLASSES), 0, None))


def test_a_decompression_bomb_is_an_unreadable_file_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses images past twice its pixel limit with its own error; a received mask
    (or image) that large is named with the unreadable ones."""
    _pair(tmp_path, "big", _ids(1, size=16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels > 2 x 100
    problems = check_masks(read_mask_folder(tmp_path, "mask_folders", CLASSES), 255, None)
    assert problems == ["1 file(s) that cannot be read as images, e.g. big.png; replace or "
                        "remove them"]


def test_a_mask_outside_the_data_root_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    _pair(root, "a", _ids(1))
    _pair(elsewhere, "secret", _ids(2))
    (root / "images" / "secret.png").symlink_to(elsewhere / "images" / "secret.png")
    (root / "masks" / "secret.png").symlink_to(elsewhere / "masks" / "secret.png")
    found = read_mask_folder(root, "mask_folders", CLASSES)
    assert [p.image.name for p in found.pairs] == ["a.png"]
    assert "1 file(s) outside" in found.problems[0] and "symbolic link" in found.problems[0]
    followed = read_mask_folder(root, "mask_folders", CLASSES, follow_links=True)
    assert len(followed.pairs) == 2 and followed.problems == []


def test_a_digit_canvas_mask_marks_exactly_its_inked_pixels() -> None:
    names = ["background", "5", "7"]
    canvases = digit_canvases(6, size=48, digits=[5, 7], per_canvas=(1, 2), scales=(2, 3))
    for canvas in canvases:
        mask = canvas_mask(canvas.pixels, canvas.boxes, names)
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert np.array_equal(mask > 0, canvas.pixels >= INK)  # ink is a digit, nothing else
        for x1, y1, x2, y2, digit in canvas.boxes:
            inked = mask[y1:y2, x1:x2][canvas.pixels[y1:y2, x1:x2] >= INK]
            assert inked.size and (inked == names.index(digit)).all()


PREP = Preprocessing(16, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_transforms_move_the_mask_with_the_pixels_and_keep_its_ids(tmp_path: Path) -> None:
    """A flip mirrors image and mask together; resizing keeps the mask's ids (nearest);
    the data's unlabelled value becomes IGNORED; the image is normalised as the weights
    expect."""
    from torchvision.transforms import v2

    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:, :3] = 255  # a bright left edge, labelled 1; the right column unlabelled
    ids = np.zeros((8, 8), dtype=np.int64)
    ids[:, :3], ids[:, 7] = 1, 255
    item = MaskItem(pixels, ids)
    plain = MaskDataset([item], mask_transform(16, PREP, False), ignore_index=255)
    image, mask = plain[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {IGNORED, 0, 1}
    assert (mask[:, :6] == 1).all() and (mask[:, 14:] == IGNORED).all()
    assert torch.allclose(image[:, 0, 0], torch.full((3,), 2.0))  # (1 - 0.5) / 0.25
    flipped = MaskDataset([item], mask_transform(16, PREP, True, [v2.RandomHorizontalFlip(1.0)]),
                          ignore_index=255)
    image_f, mask_f = flipped[(0, 3)]
    assert torch.equal(mask_f, mask.flip(-1)) and torch.equal(image_f, image.flip(-1))
    # the same (index, seed) draws the same augmentation, whatever came before
    jitter = MaskDataset([item], mask_transform(16, PREP, True, [v2.RandomResizedCrop(16)]),
                         ignore_index=255)
    first = jitter[(0, 11)]
    torch.rand(5)
    again = jitter[(0, 11)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("ignore_index", [0, 255])
def test_the_unlabelled_value_is_the_datas_own(ignore_index: int) -> None:
    ids = np.array([[0, 1], [2, 255]])
    dataset = MaskDataset([MaskItem(np.zeros((2, 2), dtype=np.uint8), ids)],
                          mask_transform(2, PREP, False), ignore_index)
    got = dataset.mask(0)
    assert torch.equal(got == IGNORED, torch.from_numpy(ids == ignore_index))
