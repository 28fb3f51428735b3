"""Offline box data: the digits scikit-learn ships pasted onto black canvases, each digit's
box the tight box around its inked pixels — deterministic for a seed, and written (when
asked) as image files with their annotations in any of the four box formats, for tests,
examples and the detection quickstart. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from finetune.data.instance_masks import canvas_instances, encode


@dataclass(frozen=True)
class Canvas:
    """A grey uint8 picture (height, width) and its boxes (x1, y1, x2, y2, digit): pixel
    edges, so x2 - x1 is the inked width."""

    pixels: np.ndarray
    boxes: list[tuple[int, int, int, int, str]]


def digit_canvases(count: int, size: int = 64, digits: list[int] | None = None,
                   per_canvas: tuple[int, int] = (1, 3), scales: tuple[int, ...] = (2, 3),
                   seed: int = 0, start: int = 0, height: int | None = None,
                   stop: int | None = None) -> list[Canvas]:
    """`count` canvases `size` pixels wide (and `height` high; square by default), each
    with `per_canvas` digits (of
    `digits`, all ten by default) that do not overlap, scaled by one of `scales`. `start`
    skips that many of each digit's images and `stop` ends there (disjoint sets: one
    stops where the other starts)."""
    bunch = load_digits()
    wanted = digits if digits is not None else list(range(10))
    pools = {d: np.flatnonzero(bunch.target == d)[start:stop] for d in wanted}
    rng = np.random.default_rng(seed)
    canvases = []
    for _ in range(count):
        pixels = np.zeros((height or size, size), dtype=np.uint8)
        taken = np.zeros_like(pixels, dtype=bool)
        boxes: list[tuple[int, int, int, int, str]] = []
        for _ in range(int(rng.integers(per_canvas[0], per_canvas[1] + 1))):
            digit = int(rng.choice(wanted))
            glyph = bunch.images[int(rng.choice(pools[digit]))]
            scale = int(rng.choice(scales))
            ink = np.kron(np.round(glyph * 255 / 16).astype(np.uint8),
                          np.ones((scale, scale), dtype=np.uint8))
            rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
            ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            h, w = ink.shape
            for _ in range(20):  # a free place, or the digit is left out
                y = int(rng.integers(0, pixels.shape[0] - h + 1))
                x = int(rng.integers(0, pixels.shape[1] - w + 1))
                if not taken[max(0, y - 1):y + h + 1, max(0, x - 1):x + w + 1].any():
                    pixels[y:y + h, x:x + w] = ink
                    taken[y:y + h, x:x + w] = True
                    boxes.append((x, y, x + w, y + h, str(digit)))
                    break
        canvases.append(Canvas(pixels, boxes))
    return canvases


def write_canvases(root: Path, canvases: list[Canvas], box_format: str) -> Path:
    """The canvases as PNG files under `root` with their annotations as `box_format` lays
    them out (box_csv: root/boxes.csv; coco: root/annotations.json beside images/, each
    digit's mask too; voc:
    root/Annotations and root/JPEGImages; yolo: root/images, root/labels and
    root/data.yaml). Returns what data.root names."""
    root.mkdir(parents=True, exist_ok=True)
    names = sorted({b[4] for c in canvases for b in c.boxes}, key=int)
    folder = root / {"voc": "JPEGImages"}.get(box_format, "images")
    folder.mkdir(exist_ok=True)
    files = []
    for i, canvas in enumerate(canvases):
        path = folder / f"{i:05d}.png"
        Image.fromarray(canvas.pixels, mode="L").save(path)
        files.append(path)
    if box_format == "box_csv":
        with open(root / "boxes.csv", "w", newline="") as handle:
            rows = csv.writer(handle)
            rows.writerow(["path", "x1", "y1", "x2", "y2", "label"])
            for path, canvas in zip(files, canvases, strict=True):
                rel = path.relative_to(root).as_posix()
                rows.writerows([[rel, *b] for b in canvas.boxes] or [[rel, "", "", "", "",
                                                                      ""]])
        return root / "boxes.csv"
    if box_format == "coco":  # each digit's inked pixels its mask, as uncompressed RLE
        ids = {n: i + 1 for i, n in enumerate(names)}
        annotations = [{"id": 0, "image_id": i, "category_id": ids[b[4]],
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0,
                        "area": int(m.sum()), "segmentation": encode(m)}
                       for i, c in enumerate(canvases)
                       for b, m in zip(c.boxes, canvas_instances(c.pixels, c.boxes),
                                       strict=True)]
        for n, entry in enumerate(annotations):
            entry["id"] = n + 1
        size = canvases[0].pixels.shape if canvases else (0, 0)
        (root / "annotations.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": p.name, "width": size[1], "height": size[0]}
                       for i, p in enumerate(files)],
            "annotations": annotations,
            "categories": [{"id": ids[n], "name": n} for n in names]}))
        return root / "annotations.json"
    if box_format == "voc":
        (root / "Annotations").mkdir(exist_ok=True)
        for path, canvas in zip(files, canvases, strict=True):
            h, w = canvas.pixels.shape
            objects = "".join(
                f"<object><name>{b[4]}</name><difficult>0</difficult><bndbox><xmin>{b[0]}"
                f"</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>"
                "</object>" for b in canvas.boxes)
            (root / "Annotations" / f"{path.stem}.xml").write_text(
                f"<annotation><filename>{path.name}</filename><size><width>{w}</width>"
                f"<height>{h}</height><depth>1</depth></size>{objects}</annotation>")
        return root
    if box_format == "yolo":
        (root / "labels").mkdir(exist_ok=True)
        index = {n: i for i, n in enumerate(names)}
        for path, canvas in zip(files, canvases, strict=True):
            h, w = canvas.pixels.shape
            (root / "labels" / f"{path.stem}.txt").write_text("".join(
                f"{index[b[4]]} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} "
                f"{(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}\n" for b in canvas.boxes))
        (root / "data.yaml").write_text("names: [" + ", ".join(f"'{n}'" for n in names)
                                        + "]\n")
        return root
    raise ValueError(f"box_format={box_format!r}: one of box_csv, coco, voc, yolo")
