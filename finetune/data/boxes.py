"""Box annotations as received data: COCO JSON, Pascal VOC XML, YOLO txt and a CSV of
`path,x1,y1,x2,y2,label` rows, read into one form (`BoxSet`: each image's file, its size and
its boxes in pixels, x1,y1,x2,y2) with every image path kept inside the data root.

The readers collect what they cannot read (a row, an object, a file) as problems and go on,
so the pre-flight check (finetune/data/box_checks.py) can name every problem at once. An
annotation file is untrusted: it is read through the bounded loaders of compose/safe_files,
an XML file that declares a DTD or entities is refused (entity expansion is how XML files
explode), and an image path that leaves the root (`../`, absolute, a symbolic link) is a
problem, not a read. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.compose.safe_files import UnsafeFile, load_json_object, load_yaml, read_text
from finetune.data.images import IMAGE_SUFFIXES
from finetune.locations import inside

# How the four numbers of a CSV row are meant (COCO is xywh, VOC xyxy, YOLO normalised
# cxcywh, each by definition).
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
MAX_ANNOTATION_BYTES = 1 << 30
MAX_LABEL_FILE_BYTES = 1 << 20  # one image's annotation file (VOC XML, YOLO txt), classes.txt


@dataclass(frozen=True)
class Box:
    """One box in pixels (x1, y1, x2, y2) and its class name; `where` says which row or
    object of which file it came from; `shape`: the object's COCO `segmentation` as written
    (polygons or RLE; None: the format has none), read by finetune/data/instance_masks.py."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    where: str
    shape: Any = None


@dataclass
class BoxedImage:
    """An image file, its size (width, height) as the annotation states it (None: not
    stated), and its boxes (none: a negative image)."""

    path: Path
    stated_size: tuple[int, int] | None = None
    boxes: list[Box] = field(default_factory=list)


@dataclass
class BoxSet:
    """What a reader found: the images, the class names in their declared order (COCO
    categories, YOLO's names, or sorted as found), and what it could not read."""

    images: list[BoxedImage]
    classes: list[str]
    problems: list[str] = field(default_factory=list)
    # the class ids the file used that name no class (COCO category ids, YOLO ids)
    unknown_ids: dict[str, list[str]] = field(default_factory=dict)


def to_xyxy(a: float, b: float, c: float, d: float, box_format: str) -> tuple[float, ...]:
    """Four numbers in `box_format` as x1, y1, x2, y2."""
    if box_format == "xywh":
        return a, b, a + c, b + d
    if box_format == "cxcywh":
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    return a, b, c, d


def _image(path: Path, root: Path, where: str, problems: list[str],
           follow_links: bool) -> Path | None:
    """The image at `path` when it stays inside `root` (a problem otherwise)."""
    if not follow_links and not inside(path, root):
        problems.append(f"{where}: the image {path} lies outside {root.resolve()} (through a "
                        "../ or absolute path or a symbolic link); an annotation file may "
                        "name only images inside its data root (data.follow_links=true on "
                        "the command line if you trust where it points)")
        return None
    return path


def _own_file(path: Path, root: Path, problems: list[str], follow_links: bool) -> bool:
    """Whether the annotation file `path` may be read: inside `root` (a symbolic link out of a
    received folder would put another file's text into class names and messages)."""
    if follow_links or inside(path, root):
        return True
    problems.append(f"data.root: the annotation file {path} lies outside {root.resolve()} "
                    "(a symbolic link); a data folder may use only its own files (data."
                    "follow_links=true on the command line if you trust where it points)")
    return False


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def read_box_csv(path: Path, box_format: str = "xyxy", follow_links: bool = False) -> BoxSet:
    """Rows of `path,x1,y1,x2,y2,label` (an optional header; `#` comments); the numbers in
    `box_format`; paths relative to the CSV. A row whose four numbers and label are empty
    names an image without boxes."""
    root = path.parent
    text = read_text(path, MAX_ANNOTATION_BYTES, "data.root:")
    found: dict[Path, BoxedImage] = {}
    problems: list[str] = []
    bad: dict[str, list[int]] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    for row in reader:
        line = reader.line_num
        if not row or row[0].lstrip().startswith("#"):
            continue
        if line == 1 and [c.strip().lower() for c in row[:2]] == ["path", "x1"]:
            continue
        cells = [c.strip() for c in row]
        if len(cells) != 6 or not cells[0]:
            bad.setdefault("not 6 fields (path,x1,y1,x2,y2,label)", []).append(line)
            continue
        image = _image(root / cells[0], root, f"{path.name} line {line}", problems,
                       follow_links)
        if image is None:
            continue
        entry = found.setdefault(image, BoxedImage(image))
        if not any(cells[1:]):
            continue  # an image without boxes
        numbers = [_number(c) for c in cells[1:5]]
        if any(n is None for n in numbers) or not cells[5]:
            bad.setdefault("a box without four numbers and a label", []).append(line)
            continue
        x1, y1, x2, y2 = to_xyxy(*numbers, box_format)  # type: ignore[arg-type]
        entry.boxes.append(Box(x1, y1, x2, y2, cells[5], f"{path.name} line {line}"))
    problems += [f"data.root: {path}: {what} on line{'s' if len(lines) > 1 else ''} "
                 f"{', '.join(map(str, lines[:5]))}{' ...' if len(lines) > 5 else ''}"
                 for what, lines in bad.items()]
    images = list(found.values())
    classes = sorted({b.label for i in images for b in i.boxes})
    if not images and not problems:
        problems.append(f"data.root: {path} has no rows; write rows of "
                        "path,x1,y1,x2,y2,label")
    return BoxSet(images, classes, problems)


def read_coco(path: Path, follow_links: bool = False) -> BoxSet:
    """A COCO instances JSON: `images` (id, file_name relative to the JSON's folder or its
    `images/`, width, height), `annotations` (image_id, bbox x,y,w,h, category_id,
    iscrowd: crowd boxes are not objects to find and are left out, as COCO's evaluation
    does; `segmentation` kept as written, for instance masks) and `categories` (id, name;
    their order is the class order)."""
    data = load_json_object(path, "data.root:")
    problems: list[str] = []
    categories = data.get("categories")
    if not isinstance(categories, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(
                c.get("name"), str) for c in categories):
        return BoxSet([], [], [f"data.root: {path}: no `categories` list of {{id, name}}; a "
                               "COCO file names its classes there"])
    name_of = {c["id"]: c["name"] for c in categories}
    root = path.parent
    images: dict[Any, BoxedImage] = {}
    refused: set[Any] = set()  # images outside the root: said once, their boxes skipped
    for n, entry in enumerate(data.get("images") or []):
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(entry.get("id"), int | str):
            problems.append(f"data.root: {path}: images[{n}] has no id and file_name")
            continue
        where = root / name
        if not where.exists() and (root / "images" / name).exists():
            where = root / "images" / name
        image = _image(where, root, f"{path.name} images[{n}]", problems, follow_links)
        if image is None:
            refused.add(entry["id"])
            continue
        size = (entry.get("width"), entry.get("height"))
        images[entry["id"]] = BoxedImage(image, size if all(isinstance(s, int) for s in size)
                                         else None)
    unknown: dict[str, list[str]] = {}
    orphans = []
    for n, ann in enumerate(data.get("annotations") or []):
        where = f"{path.name} annotations[{n}]"
        if not isinstance(ann, dict) or ann.get("iscrowd"):
            continue
        bbox = ann.get("bbox")
        numbers = [_number(str(v)) for v in bbox] if isinstance(bbox, list) else []
        if len(numbers) != 4 or any(v is None for v in numbers):
            problems.append(f"data.root: {where}: bbox is not four numbers x,y,w,h")
            continue
        image_id, category = ann.get("image_id"), ann.get("category_id")
        if not isinstance(image_id, int | str) or image_id not in images:
            if not isinstance(image_id, int | str) or image_id not in refused:
                orphans.append(str(image_id))
            continue
        if not isinstance(category, int) or category not in name_of:
            unknown.setdefault(str(category), []).append(where)
            continue
        x1, y1, x2, y2 = to_xyxy(*numbers, "xywh")  # type: ignore[arg-type]
        images[image_id].boxes.append(Box(x1, y1, x2, y2, name_of[category], where,
                                          ann.get("segmentation")))
    if orphans:
        problems.append(f"data.root: {path}: {len(orphans)} annotation(s) name an image id "
                        f"that `images` does not list (e.g. {orphans[0]})")
    return BoxSet(list(images.values()), [c["name"] for c in categories], problems, unknown)


_DECLARATIONS = re.compile(r"<!DOCTYPE|<!ENTITY", re.IGNORECASE)


def _xml(path: Path) -> ET.Element:
    """An XML file without a DTD or entities, parsed (ValueError: why it is not)."""
    text = read_text(path, MAX_LABEL_FILE_BYTES, "data.root:")
    if _DECLARATIONS.search(text):
        raise ValueError("declares a DTD or entities, which an annotation never needs")
    try:
        return ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"not XML ({err})") from None


def read_voc(root: Path, follow_links: bool = False) -> BoxSet:
    """Pascal VOC: root/Annotations/*.xml (filename, size, objects with name and bndbox
    xmin,ymin,xmax,ymax in pixels; VOC counts pixels from 1, kept as written) and the images
    in root/JPEGImages (or beside the annotations' folder). `difficult` objects are kept."""
    problems: list[str] = []
    folder = root / "Annotations"
    files = sorted(folder.glob("*.xml")) if folder.is_dir() else []
    if not files:
        return BoxSet([], [], [f"data.root: {root} has no Annotations/*.xml; a VOC folder "
                               "holds Annotations/ and JPEGImages/"])
    images = []
    for file in files:
        if not _own_file(file, root, problems, follow_links):
            continue
        try:
            tree = _xml(file)
        except (ValueError, UnsafeFile) as err:
            problems.append(f"data.root: {file}: {err}")
            continue
        name = (tree.findtext("filename") or "").strip()
        if not name:
            problems.append(f"data.root: {file}: no <filename>")
            continue
        path = _image(root / "JPEGImages" / name, root, file.name, problems, follow_links)
        if path is None:
            continue
        width, height = (_number(tree.findtext(f"size/{k}") or "") for k in ("width",
                                                                               "height"))
        image = BoxedImage(path, (int(width), int(height)) if width and height else None)
        for n, obj in enumerate(tree.findall("object")):
            where = f"{file.name} object {n + 1}"
            numbers = [_number(obj.findtext(f"bndbox/{k}") or "")
                       for k in ("xmin", "ymin", "xmax", "ymax")]
            label = (obj.findtext("name") or "").strip()
            if any(v is None for v in numbers) or not label:
                problems.append(f"data.root: {where}: no name and bndbox "
                                "xmin,ymin,xmax,ymax")
                continue
            image.boxes.append(Box(*numbers, label, where))  # type: ignore[misc]
        images.append(image)
    return BoxSet(images, sorted({b.label for i in images for b in i.boxes}), problems)


def _yolo_names(root: Path, problems: list[str], follow_links: bool) -> list[str] | None:
    """YOLO's class names: data.yaml's `names` (a list, or a mapping of id 0, 1, ... to name)
    or classes.txt, one per line."""
    listing, names_file = root / "data.yaml", root / "classes.txt"
    if listing.is_file() and _own_file(listing, root, problems, follow_links):
        data = load_yaml(listing, "data.root:")
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            ids = sorted(k for k in names if isinstance(k, int))
            names = [names[k] for k in ids] if ids == list(range(len(names))) else None
        return [str(n) for n in names] if isinstance(names, list) else None
    if names_file.is_file() and _own_file(names_file, root, problems, follow_links):
        text = read_text(names_file, MAX_LABEL_FILE_BYTES, "data.root:")
        return [line.strip() for line in text.splitlines() if line.strip()]
    return None


def read_yolo(root: Path, follow_links: bool = False) -> BoxSet:
    """YOLO: root/images/<name>.<ext> and root/labels/<name>.txt, one `class cx cy w h` line
    per box, normalised to the image's size; class names from root/data.yaml (`names`) or
    root/classes.txt. An image without a labels file, or with an empty one, has no boxes."""
    problems: list[str] = []
    names = _yolo_names(root, problems, follow_links)
    if names is None:
        return BoxSet([], [], [*problems, f"data.root: {root} has no data.yaml with `names` "
                               "(a list, or ids 0, 1, ... to names) nor a classes.txt; YOLO "
                               "labels are class ids, and the names are needed to know them"])
    folder = root / "images"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []
    if not files:
        return BoxSet([], names, [f"data.root: {root}/images holds no images"])
    unknown: dict[str, list[str]] = {}
    images = []
    for file in files:
        path = _image(file, root, f"{root.name}/images", problems, follow_links)
        if path is None:
            continue
        image = BoxedImage(path)
        labels = root / "labels" / file.relative_to(folder).with_suffix(".txt")
        if labels.is_file() and _own_file(labels, root, problems, follow_links):
            size = image_size(path)
            text = read_text(labels, MAX_LABEL_FILE_BYTES, "data.root:")
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{labels.name} line {n}"
                cells = line.split()
                numbers = [_number(c) for c in cells[1:5]]
                if len(cells) != 5 or any(v is None for v in numbers):
                    problems.append(f"data.root: {where}: not `class cx cy w h`")
                    continue
                if not cells[0].isdigit() or int(cells[0]) >= len(names):
                    unknown.setdefault(cells[0], []).append(where)
                    continue
                scale = size or (1, 1)
                cx, cy, w, h = (numbers[0] * scale[0], numbers[1] * scale[1],  # type: ignore
                                numbers[2] * scale[0], numbers[3] * scale[1])  # type: ignore
                image.boxes.append(Box(*to_xyxy(cx, cy, w, h, "cxcywh"),
                                       names[int(cells[0])], where))
        images.append(image)
    return BoxSet(images, names, problems, unknown)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header (nothing decoded); None: not an image."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


READERS = {"box_csv": read_box_csv, "coco": read_coco, "voc": read_voc, "yolo": read_yolo}
