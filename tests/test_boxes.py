"""Box data as received: the four annotation formats read into one form from the same digit
canvases, every image path kept inside the data root, and the label pre-flight check naming
every problem at once (classes, num_classes, files, sizes, boxes, the declared box format,
images without boxes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.box_checks import check_boxes, format_problem
from finetune.data.boxes import READERS, Box, read_box_csv, read_coco, read_voc, read_yolo
from finetune.data.canvases import digit_canvases, write_canvases

FORMATS = ["box_csv", "coco", "voc", "yolo"]


def _read(box_format: str, where: Path, **kwargs: object):
    return READERS[box_format](where, **kwargs)


def _boxes(found) -> dict[str, list[tuple[float, ...]]]:
    return {i.path.name: sorted((b.x1, b.y1, b.x2, b.y2, b.label) for b in i.boxes)
            for i in found.images}


def test_canvases_are_deterministic_and_their_boxes_are_tight() -> None:
    first, again = digit_canvases(12, seed=3), digit_canvases(12, seed=3)
    assert all(np.array_equal(a.pixels, b.pixels) and a.boxes == b.boxes
               for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0].pixels, digit_canvases(1, seed=4)[0].pixels)
    for canvas in first:
        assert 1 <= len(canvas.boxes) <= 3
        ink = canvas.pixels > 0
        covered = np.zeros_like(ink)
        for x1, y1, x2, y2, digit in canvas.boxes:
            inside = ink[y1:y2, x1:x2]
            # tight: ink on every edge of the box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and \
                inside[:, -1].any(), (x1, y1, x2, y2)
            assert not covered[y1:y2, x1:x2].any()  # no two boxes overlap
            covered[y1:y2, x1:x2] = True
            assert digit in [str(d) for d in range(10)]
        assert not (ink & ~covered).any()  # every inked pixel is in a box


@pytest.mark.parametrize("box_format", FORMATS)
def test_every_format_reads_the_same_boxes(tmp_path: Path, box_format: str) -> None:
    canvases = digit_canvases(6, size=64, height=40, digits=[1, 4, 7], seed=1)
    where = write_canvases(tmp_path, canvases, box_format)
    found = _read(box_format, where)
    assert found.problems == [] and found.unknown_ids == {}
    assert found.classes == ["1", "4", "7"]
    expected = {f"{i:05d}.png": sorted((*tuple(float(v) for v in b[:4]), b[4])
                                       for b in c.boxes) for i, c in enumerate(canvases)}
    got = _boxes(found)
    assert got.keys() == expected.keys()
    for name, boxes in expected.items():  # YOLO's normalised numbers: within 0.01 pixel
        assert len(got[name]) == len(boxes)
        for mine, theirs in zip(got[name], boxes, strict=True):
            assert mine[4] == theirs[4] and np.allclose(mine[:4], theirs[:4], atol=0.01)
    assert all(i.path.is_file() and i.path.parent.parent == tmp_path for i in found.images)
    checked = check_boxes(found, box_format="xyxy" if box_format == "box_csv" else None)
    assert checked.problems == []
    assert set(checked.sizes.values()) == {(64, 40)}  # (width, height)


def _csv(tmp_path: Path, rows: list[str], size: int = 32) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (size, size)).save(tmp_path / name)
    (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2,label\n" + "\n".join(rows) + "\n")
    return tmp_path / "boxes.csv"


def test_the_pre_flight_check_names_every_problem_at_once(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path.parent / "elsewhere.png").write_bytes(b"")
    path = _csv(tmp_path, [
        "a.png,1,1,10,10,cat",
        "a.png,4,4,4,12,cat",          # no area
        "b.png,20,20,40,30,dog",       # outside the 32x32 image
        "b.png,2,2,8,8,bird",          # a class data.classes does not list
        "gone.png,1,1,5,5,cat",        # missing
        "notes.txt,1,1,5,5,cat",       # not an image
        "../elsewhere.png,1,1,5,5,cat",  # outside the root
        "c.png,1,2,three,4,cat",       # not four numbers
        "c.png,1,2,3",                 # not six fields
        "c.png,,,,,"])                 # an image without boxes: kept by default
    found = read_box_csv(path)
    problems = check_boxes(found, classes=["cat", "dog"], num_classes=3,
                           box_format="xyxy").problems
    expected = [
        "lies outside", "a box without four numbers and a label on line 9",
        "not 6 fields (path,x1,y1,x2,y2,label) on line 10",
        "1 box(es) of class 'bird', which data.classes does not list (cat, dog), e.g. "
        "boxes.csv line 5",
        "head.num_classes=3, but the data has 2 object classes (cat, dog)",
        "1 image file(s) the annotations name do not exist",
        "1 file(s) the annotations name are not images",
        "1 box(es) have no area (x2 <= x1 or y2 <= y1), e.g. boxes.csv line 3 (4,4,4,12)",
        "1 box(es) reach outside their image, e.g. boxes.csv line 4 (20,20,40,30 in 32x32)"]
    assert len(problems) == len(expected), problems
    for part, problem in zip(expected, problems, strict=True):
        assert part in problem, (part, problem)
    assert all("\n" not in p for p in problems)
    assert "elsewhere" not in {i.path.name for i in found.images}


@pytest.mark.parametrize(("written", "declared", "suggested"), [
    ("xywh", "xyxy", "xywh"), ("xyxy", "xywh", "xyxy"),
    ("xyxy", "xyxy", None), ("xywh", "xywh", None)])
def test_a_box_format_other_than_the_declared_one_is_named(
        tmp_path: Path, written: str, declared: str, suggested: str | None) -> None:
    canvases = digit_canvases(8, size=48, seed=2)
    rows = []
    for i, canvas in enumerate(canvases):
        Image.fromarray(canvas.pixels).save(tmp_path / f"{i}.png")
        for x1, y1, x2, y2, digit in canvas.boxes:
            numbers = (x1, y1, x2, y2) if written == "xyxy" else (x1, y1, x2 - x1, y2 - y1)
            rows.append(f"{i}.png,{','.join(map(str, numbers))},{digit}")
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    found = read_box_csv(tmp_path / "boxes.csv", declared)
    problems = check_boxes(found, box_format=declared).problems
    if suggested is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].endswith(
            f"set data.box_format={suggested}"), problems


def test_a_few_bad_boxes_are_bad_boxes_not_another_format() -> None:
    good = [(Box(1, 1, 20, 20, "a", f"r{i}"), (32, 32)) for i in range(30)]
    bad = [(Box(10, 10, 5, 5, "a", "r30"), (32, 32))]
    assert format_problem(good + bad, "xyxy") is None  # 1 in 31: under the evidence share
    assert format_problem(good, "xyxy") is None


@pytest.mark.parametrize("empty", ["keep", "refuse"])
def test_images_without_boxes_are_negatives_or_refused(tmp_path: Path, empty: str) -> None:
    found = read_box_csv(_csv(tmp_path, ["a.png,1,1,10,10,cat", "b.png,,,,,"]))
    assert [len(i.boxes) for i in found.images] == [1, 0]
    problems = check_boxes(found, empty=empty).problems
    assert problems == ([] if empty == "keep" else [
        "1 image(s) have no boxes, e.g. b.png; data.empty_images=keep trains on them as "
        "negatives (nothing to find), or annotate them"])
    none = read_box_csv(_csv(tmp_path, ["a.png,,,,,", "b.png,,,,,"]))
    assert any("none of the 2 images has a box" in p for p in check_boxes(none).problems)


@pytest.mark.parametrize("box_format", FORMATS)
def test_no_format_reads_an_image_outside_its_root(tmp_path: Path, box_format: str) -> None:
    """A received annotation file names `../secret.png` (or its images/ holds a link out):
    a problem, never an image read; data.follow_links=true lets the user allow it."""
    secret = tmp_path / "secret.png"
    Image.new("L", (48, 48), 255).save(secret)
    root = tmp_path / "received"
    where = write_canvases(root, digit_canvases(2, size=48, seed=5), box_format)
    escape = os.path.relpath(secret, {"voc": root / "JPEGImages"}.get(box_format, root))
    if box_format == "box_csv":
        with open(where, "a") as handle:
            handle.write(f"{escape},1,1,5,5,1\n")
    elif box_format == "coco":
        data = json.loads(where.read_text())
        data["images"].append({"id": 99, "file_name": escape, "width": 48, "height": 48})
        where.write_text(json.dumps(data))
    elif box_format == "voc":
        (root / "Annotations" / "zz.xml").write_text(
            f"<annotation><filename>{escape}</filename></annotation>")
    else:
        (root / "images" / "zz.png").symlink_to(secret)
    found = _read(box_format, where)
    assert len(found.images) == 2 and all(i.path.resolve() != secret for i in found.images)
    assert len(found.problems) == 1 and "lies outside" in found.problems[0] \
        and "data.follow_links=true" in found.problems[0], found.problems
    trusted = _read(box_format, where, follow_links=True)
    assert len(trusted.images) == 3 and trusted.problems == []


def test_an_xml_file_with_entities_is_refused_unexpanded(tmp_path: Path) -> None:
    write_canvases(tmp_path, digit_canvases(1, size=48, seed=6), "voc")
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
            '<annotation><filename>00000.png</filename><object><name>&lol2;</name>'
            '<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>'
            '</object></annotation>')
    (tmp_path / "Annotations" / "bomb.xml").write_text(bomb)
    found = read_voc(tmp_path)
    assert len(found.images) == 1 and "lol" not in found.classes
    assert found.problems == [f"data.root: {tmp_path / 'Annotations' / 'bomb.xml'}: declares "
                              "a DTD or entities, which an annotation never needs"]


def test_class_ids_and_stated_sizes_are_checked(tmp_path: Path) -> None:
    coco = write_canvases(tmp_path / "coco", digit_canvases(3, size=48, digits=[2, 3],
                                                            seed=7), "coco")
    data = json.loads(coco.read_text())
    data["annotations"][0]["category_id"] = 42
    data["images"][1]["width"] = 64
    coco.write_text(json.dumps(data))
    problems = check_boxes(read_coco(coco)).problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("1 box(es) have class id 42, which names no class (the "
                                  "classes: 2, 3), e.g. annotations.json annotations[0]")
    assert problems[1].startswith("1 image(s) differ in size from their annotation, e.g. "
                                  "00001.png (stated 64x48, the file 48x48)")
    yolo = write_canvases(tmp_path / "yolo", digit_canvases(2, size=48, digits=[2, 3],
                                                            seed=7), "yolo")
    labels = sorted((yolo / "labels").glob("*.txt"))[0]
    labels.write_text(labels.read_text() + "5 0.5 0.5 0.1 0.1\n")
    found = read_yolo(yolo)
    assert list(found.unknown_ids) == ["5"]
    assert check_boxes(found).problems[0].startswith(
        f"1 box(es) have class id 5, which names no class (the classes: 2, 3), e.g. "
        f"{labels.name} line")


@pytest.mark.parametrize("planted", ["voc-xml", "yolo-labels", "yolo-names", "classes-txt"])
def test_no_annotation_file_is_read_through_a_link_out_of_the_root(tmp_path: Path,
                                                                    planted: str) -> None:
    """A received folder's annotation file that is a symbolic link to a file elsewhere (its
    lines would become class names and messages): a problem, its text never read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    root = tmp_path / "received"
    box_format = "voc" if planted == "voc-xml" else "yolo"
    where = write_canvases(root, digit_canvases(2, size=48, seed=5), box_format)
    target = {"voc-xml": root / "Annotations" / "00000.xml",
              "yolo-labels": root / "labels" / "00000.txt",
              "yolo-names": root / "data.yaml", "classes-txt": root / "classes.txt"}[planted]
    if planted == "classes-txt":
        (root / "data.yaml").unlink()
    target.unlink(missing_ok=True)
    target.symlink_to(secret)
    found = _read(box_format, where)
    assert "root:x:0:0" not in found.classes and not any("root:x" in p for p in found.problems)
    assert any(p.startswith(f"data.root: the annotation file {target} lies outside")
               for p in found.problems), found.problems


@pytest.mark.parametrize("names", ["[a, b]", "{names: {0: a, x: b}}", "{names: {1: a, 2: b}}",
                                   "{names: 7}"])
def test_yolo_names_that_are_not_a_list_or_ids_from_0_are_one_sentence(
        tmp_path: Path, names: str) -> None:
    where = write_canvases(tmp_path, digit_canvases(2, size=48, seed=5), "yolo")
    (tmp_path / "data.yaml").write_text(names + "\n")
    found = read_yolo(where)
    assert found.images == [] and len(found.problems) == 1
    assert "has no data.yaml with `names` (a list, or ids 0, 1, ... to names)" in \
        found.problems[0]


def test_coco_ids_of_any_json_type_are_problems_not_tracebacks(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.new("L", (48, 48)).save(secret)
    coco = write_canvases(tmp_path / "coco", digit_canvases(2, size=48, seed=5), "coco")
    data = json.loads(coco.read_text())
    data["images"] += [{"id": [1], "file_name": "x.png"},
                       {"id": 50, "file_name": "../secret.png"}]
    data["annotations"] += [{"image_id": {"a": 1}, "bbox": [1, 1, 4, 4], "category_id": 1},
                            {"image_id": 0, "bbox": [1, 1, 4, 4], "category_id": [1]},
                            {"image_id": 50, "bbox": [1, 1, 4, 4], "category_id": 1}]
    coco.write_text(json.dumps(data))
    found = read_coco(coco)
    assert len(found.images) == 2 and list(found.unknown_ids) == ["[1]"]
    # the image outside the root is said once; its annotation is not an orphan besides
    problems = found.problems
    assert len(problems) == 3, problems
    assert problems[0].endswith("images[2] has no id and file_name")
    assert "images[3]: the image" in problems[1] and "lies outside" in problems[1]
    assert "1 annotation(s) name an image id that `images` does not list (e.g. {'a': 1})" \
        in problems[2]
