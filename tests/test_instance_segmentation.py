"""task: instance_segmentation end to end on the digit canvases: a Mask R-CNN on the digits
classifier's features trains with the real Trainer and measures mask mAP (monitored) and box
mAP; evaluate gives the same figures on its own validation images and reads COCO masks in all
three of COCO's forms alike; predict writes each object's mask; export is checked on masks
too; every problem of the data and the config is said at once, before anything trains."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faster_coco_eval.core import mask as coco_mask
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision
from torchvision.transforms import v2

import finetune
from finetune.commands.evaluate import evaluate_run
from finetune.commands.export import export
from finetune.compose.prepare import compose_config
from finetune.data.box_datasets import BoxDataset, box_transform, canvas_items
from finetune.data.canvases import digit_canvases, write_canvases
from finetune.data.instance_masks import decode
from finetune.rundir.box_evaluation import (
    SHOWN_SCORE,
    THUMBNAIL,
    BoxOutputs,
    MaskMistakes,
    box_metrics,
    evaluate_boxes,
    image_mask_mistakes,
    mask_iou,
    mistakes,
    thumbnail,
    worst_so_far,
)
from finetune.rundir.box_inference import found_boxes
from finetune.rundir.detector_export import MASK_TOLERANCE, paired
from finetune.tasks.instances import MASK_MAP_METRICS, InstanceSegmentation
from finetune.training.plan import plan_run
from tests.conftest import main_here, ranked_leaderboard, read_json, run_cli

# box_score_thresh=0: even a barely trained Mask R-CNN returns objects, so that masks are
# predicted, exported and compared
TINY = ["weights.source=none", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
        "data.canvases.count=24", "data.canvases.size=64", "data.batch_size=4",
        "trainer.enable_progress_bar=false", "model.detector.kwargs.box_score_thresh=0.0",
        "model.detector.kwargs.box_detections_per_img=8"]


@pytest.fixture(scope="module")
def instance_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, a COCO folder of other canvases of the digits 6 and 8, masks as RLE)."""
    root = tmp_path_factory.mktemp("instances")
    result = finetune.train("digits_instances", TINY, run_dir=root / "run")
    canvases = digit_canvases(6, size=64, digits=[6, 8], per_canvas=(1, 2), scales=(3, 4),
                              seed=5, start=150)
    return result.run_dir, write_canvases(root / "other", canvases, "coco")


def test_a_run_measures_masks_and_boxes_and_reports_both(instance_run: tuple[Path, Path]
                                                        ) -> None:
    run, _ = instance_run
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["task"] == "instance_segmentation"
    assert all(0.0 <= metrics[k] <= 1.0 for k in MASK_MAP_METRICS), metrics
    assert metrics["metric"] == "val/mask_map"
    assert metrics["best/val/mask_map"] == metrics["val/mask_map"]
    assert set(metrics["val/mask_ap_per_class"]) <= {"5", "6", "7", "8", "9"}
    assert "val/ap_per_class" not in metrics
    saved = read_json(run / "evaluation.json")["val"]
    assert {"mask_map", "mask_map_50", "mask_map_75", "mask_mar_100"} <= set(saved)
    assert all("mask_ap" in row for row in saved["per_class"])
    page = (run / "report.html").read_text()
    assert "mask mAP" in page and "box mAP" in page and "mask AP (IoU 0.5:0.95)" in page
    assert "most missed and false masks" in page and saved["match"]["on"] == "masks"
    assert "a found mask matches a true one of its class at mask IoU" in page
    trained = finetune.load(run)
    assert type(trained).__name__ == "MaskRCNN"
    assert trained.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 6


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "received"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def test_evaluate_on_its_own_val_gives_the_runs_mask_figures(
        instance_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The masks measured twice — by the LightningModule's metric in training, and streamed
    by evaluate on the same validation canvases — agree; so do the boxes."""
    run, _ = instance_run
    metrics = read_json(run / "metrics.json")
    result, _ = evaluate_run(_copy(run, tmp_path))
    assert result["images"] == metrics["val_images"]
    for key in ("map", "map_50", "mar_100"):
        assert result[f"mask_{key}"] == pytest.approx(metrics[f"val/mask_{key}"], abs=1e-6)
        assert result[key] == pytest.approx(metrics[f"val/{key}"], abs=1e-6)
    mask_ap = {r["class"]: r["mask_ap"] for r in result["per_class"]}
    for name, value in metrics["val/mask_ap_per_class"].items():
        assert (mask_ap[name] if mask_ap[name] is not None else -1) == pytest.approx(
            value, abs=1e-6), name


def _rewritten(coco: Path, tmp_path: Path, form: str) -> Path:
    """The COCO folder with every mask in another of COCO's forms."""
    folder = tmp_path / form
    shutil.copytree(coco.parent, folder)
    data = json.loads(coco.read_text())
    for ann in data["annotations"]:
        rle = ann["segmentation"]
        if form == "string":
            mask = decode(rle, *rle["size"])
            ann["segmentation"] = {"size": rle["size"], "counts": coco_mask.encode(
                np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()}
        else:  # a polygon around each inked pixel run of a column: the same pixels
            mask = decode(rle, *rle["size"])
            ann["segmentation"] = [[float(x), float(y), float(x), float(y), float(x),
                                    float(y)] for y, x in np.argwhere(mask)]
    (folder / coco.name).write_text(json.dumps(data))
    return folder / coco.name


def test_evaluate_reads_cocos_three_mask_forms_alike(
        instance_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Masks as uncompressed RLE, as COCO's compressed strings, and as polygons (a point per
    pixel, which Pillow fills as that pixel) give one result; the true objects are counted
    under the run's classes by name."""
    run, coco = instance_run
    results = []
    for form in ("rle", "string", "polygons"):
        data = coco if form == "rle" else _rewritten(coco, tmp_path, form)
        result, _ = evaluate_run(run, ["data=coco", f"data.root={data}"],
                                 output=tmp_path / f"eval_{form}")
        results.append(result)
    assert results[0]["mask_map"] == results[1]["mask_map"] == results[2]["mask_map"]
    assert [r["mask_ap"] for r in results[0]["per_class"]] == [
        r["mask_ap"] for r in results[2]["per_class"]]
    counts = {r["class"]: r["boxes"] for r in results[0]["per_class"]}
    assert counts["6"] and counts["8"] and counts["5"] == counts["7"] == counts["9"] == 0


def test_predict_writes_each_objects_mask(instance_run: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, coco = instance_run
    images = coco.parent / "images"
    output = tmp_path / "objects.csv"
    code, _, err = main_here("predict", f"run={run}", f"input={images}", f"output={output}",
                             "min_score=0", f"draw={tmp_path / 'drawn'}", capsys=capsys)
    assert code == 0, err
    found = json.loads((tmp_path / "objects.json").read_text())
    assert found["mask_format"].startswith("COCO RLE")
    with open(output, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][-1] == "mask_pixels"
    boxes = [(image, box) for image in found["images"] for box in image["boxes"]]
    assert len(boxes) == len(rows) - 1 > 0
    for (image, box), row in zip(boxes, rows[1:], strict=True):
        mask = decode(box["mask"], image["height"], image["width"])
        assert int(row[-1]) == box["mask_pixels"] == int(mask.sum())
    drawn = sorted((tmp_path / "drawn").iterdir())
    assert len(drawn) == len(found["images"])
    # a drawn mask tints its pixels: the drawing differs from the grey canvas inside it
    image, box = next((i, b) for i, b in boxes if b["mask_pixels"])
    index = found["images"].index(image)
    picture = np.asarray(Image.open(drawn[index]).convert("RGB")).astype(int)
    mask = decode(box["mask"], image["height"], image["width"])
    channels = picture[mask]
    assert (channels.max(axis=1) != channels.min(axis=1)).any()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_is_checked_on_masks_too(instance_run: tuple[Path, Path], tmp_path: Path,
                                        fmt: str) -> None:
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("the onnx extra is not installed")
    run, _ = instance_run
    info = export(run, fmt, tmp_path)
    assert info["task"] == "instance_segmentation" and "masks (N, 1, H, W)" in info["output"]
    assert info["parity_boxes_compared"] > 0
    assert info["parity_max_mask_diff"] <= info["tolerance"]["masks"]
    if fmt == "torchscript":
        image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(3))
        model = finetune.load(run, device="cpu")
        loaded = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
        with torch.inference_mode():
            want, got = model([image])[0], loaded([image])[1][0]
        assert got["masks"].shape == want["masks"].shape and len(want["masks"]) > 0
        assert torch.allclose(got["masks"], want["masks"], atol=1e-4)


@pytest.mark.parametrize("crop", [False, True])
def test_masks_move_with_the_boxes_under_augmentation(crop: bool) -> None:
    """A flip moves each object's mask with its box: the mask is the unflipped one mirrored
    exactly when the boxes are. A resized crop as well may cut an object: its mask stays
    inside its (clipped) box."""
    canvases = digit_canvases(8, size=64, per_canvas=(2, 3), scales=(3,), seed=4)
    items = canvas_items(canvases, [str(d) for d in range(10)])
    augment = [v2.RandomResizedCrop(64, scale=(0.6, 1.0), antialias=True)] if crop else []
    data = BoxDataset(items, box_transform(True, flip=True, augment=augment), masks=True)
    plain = BoxDataset(items, box_transform(False), masks=True)
    torch.manual_seed(0)
    flips = []
    for index in range(len(data)):
        _, target = data[index]
        _, original = plain[index]
        assert len(target["masks"]) == len(target["boxes"]) == len(target["labels"])
        if not crop:
            mirrored = original["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) \
                + torch.tensor([64, 0, 64, 0])
            flips.append(torch.equal(target["boxes"], mirrored))
            assert flips[-1] or torch.equal(target["boxes"], original["boxes"])
            want = original["masks"].flip(-1) if flips[-1] else original["masks"]
            assert torch.equal(target["masks"], want)
            continue
        for mask, box in zip(target["masks"], target["boxes"], strict=True):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            if len(rows):  # inside the box, a resized pixel either way
                x1, y1, x2, y2 = box.tolist()
                assert cols.min() >= x1 - 1.5 and rows.min() >= y1 - 1.5
                assert cols.max() + 1 <= x2 + 1.5 and rows.max() + 1 <= y2 + 1.5
    assert crop or (any(flips) and not all(flips))  # both cases were seen


def _problems(*overrides: str) -> list[str]:
    cfg, _ = compose_config(["recipe=digits_instances", "weights.source=none", *overrides])
    return plan_run(cfg, load=False).problems


def _broken_coco(tmp_path: Path) -> Path:
    canvases = digit_canvases(6, size=48, digits=[5, 6], per_canvas=(2, 2), scales=(2,),
                              seed=3)
    coco = write_canvases(tmp_path / "coco", canvases, "coco")
    data = json.loads(coco.read_text())
    anns: list[dict[str, Any]] = data["annotations"]
    del anns[0]["segmentation"]
    anns[1]["segmentation"] = {"size": [32, 48], "counts": [48 * 32]}
    anns[2]["segmentation"] = [[1, 1, 9000, 1, 5, 5]]
    anns[3]["segmentation"] = {"size": [48, 48], "counts": [48 * 48]}
    coco.write_text(json.dumps(data))
    return coco


def test_every_mask_problem_of_coco_data_is_said_at_once(tmp_path: Path) -> None:
    coco = _broken_coco(tmp_path)
    problems = _problems("data=coco", f"data.root={coco}", "data.classes=null")
    text = "\n".join(problems)
    assert "1 object(s) have no segmentation" in text, text
    assert "2 segmentation(s) cannot be read as masks of their image" in text
    assert "is 32x48 (height x width) but the image is 48x48" in text
    assert "1 segmentation(s) cover no pixel" in text
    assert "annotations[0]" in text and "annotations[3]" in text
    # the same data trains boxes alone: its masks are not read for task=detection
    detection = _problems("data=coco", f"data.root={coco}", "data.classes=null",
                          "task=detection", "metric=val/map", "model.detector.head=fasterrcnn")
    assert not any("segmentation" in p for p in detection), detection


@pytest.mark.parametrize(("overrides", "said"), [
    (["data=voc", "data.root=/nowhere"], "data=voc holds boxes without masks"),
    (["data=yolo", "data.root=/nowhere"], "data=yolo holds boxes without masks"),
    (["data=box_csv", "data.root=/nowhere"], "data=box_csv holds boxes without masks"),
    (["model.detector.head=fasterrcnn"], "model.detector.head=fasterrcnn: finds no masks"),
    (["model.detector.head=retinanet"], "model.detector.head=retinanet: finds no masks"),
    (["model.name=fasterrcnn_resnet50_fpn", "weights.source=none", "model.source=torchvision",
      "model.detector.levels=[]", "model.detector.kwargs={}"],
     "model.name=fasterrcnn_resnet50_fpn: finds no masks"),
    (["task=detection", "metric=val/map"], "model.detector.head=maskrcnn: finds masks, and "
                                           "task=detection has none"),
    (["metric=val/miou"], "metric=val/miou: not measured with task=instance_segmentation"),
    (["loss.class_weights=[1,1,1,1,1]"], "not taken with task=instance_segmentation"),
])
def test_what_an_instance_run_cannot_take_is_one_sentence(overrides: list[str], said: str
                                                         ) -> None:
    problems = _problems(*overrides)
    assert any(said in p for p in problems), problems


def _objects(masks: list[np.ndarray], labels: list[int], scores: list[float] | None = None
             ) -> dict[str, torch.Tensor]:
    boxes = [[float(np.nonzero(m)[1].min()), float(np.nonzero(m)[0].min()),
              float(np.nonzero(m)[1].max() + 1), float(np.nonzero(m)[0].max() + 1)]
             for m in masks]
    found = {"boxes": torch.tensor(boxes).reshape(-1, 4),
             "labels": torch.tensor(labels, dtype=torch.long),
             "masks": torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))
             if masks else torch.zeros(0, 1, 20, 20)}
    if scores is not None:
        found["scores"] = torch.tensor(scores)
    return found


def _square(x: int, y: int, side: int) -> np.ndarray:
    mask = np.zeros((20, 20), dtype=bool)
    mask[y:y + side, x:x + side] = True
    return mask


def test_parity_pairs_masks_and_catches_a_changed_one() -> None:
    """Two objects in either order pair by box; a mask that differs in more than
    MASK_TOLERANCE of its pixels is caught, one that differs nowhere is not."""
    want = _objects([_square(1, 1, 6), _square(10, 10, 8)], [1, 2], [0.9, 0.8])
    same = _objects([_square(10, 10, 8), _square(1, 1, 6)], [2, 1], [0.8, 0.9])
    assert paired(want, same) == (0.0, 0.0, 0.0)
    moved = _square(1, 1, 6)
    moved[7, 1] = True  # one pixel more: 1/400 of the image
    changed = _objects([_square(10, 10, 8), moved], [2, 1], [0.8, 0.9])
    changed["boxes"] = same["boxes"]
    assert paired(want, changed)[2] == pytest.approx(1 / 400) and MASK_TOLERANCE < 1 / 400
    unmasked = {k: v for k, v in same.items() if k != "masks"}
    assert paired(want, unmasked)[2] == float("inf")


def test_mask_figures_are_cocos_and_nothing_found_is_zero() -> None:
    """Every true object found with its exact mask: mask mAP 1 and each class's mask AP 1;
    the boxes found with the wrong masks: mask mAP 0 while box mAP stays 1; nothing found at
    all: 0 (torchmetrics says -1 for masks there), not 'not measured'."""
    truth = _objects([_square(1, 1, 6), _square(10, 10, 8)], [1, 2])
    cases = {"exact": _objects([_square(1, 1, 6), _square(10, 10, 8)], [1, 2], [0.9, 0.8]),
             "wrong masks": {**_objects([_square(1, 1, 6), _square(10, 10, 8)], [1, 2],
                                        [0.9, 0.8]),
                             "masks": _objects([_square(4, 4, 2), _square(16, 16, 2)], [1, 2]
                                               )["masks"]},
             "nothing": _objects([], [], [])}
    figures = {}
    for name, found in cases.items():
        metric = MeanAveragePrecision(iou_type="segm", class_metrics=True,
                                      backend="faster_coco_eval")
        metric.update([{**found, "masks": found["masks"][:, 0] > 0.5}],
                      [{**truth, "masks": truth["masks"][:, 0] > 0.5}])
        outputs = BoxOutputs([{k: v for k, v in found.items() if k != "masks"}],
                             [{k: v for k, v in truth.items() if k != "masks"}], ["#0"],
                             metric)
        figures[name] = box_metrics(outputs, ["a", "b"])
    assert figures["exact"]["mask_map"] == 1.0 and figures["exact"]["map"] == 1.0
    assert [r["mask_ap"] for r in figures["exact"]["per_class"]] == [1.0, 1.0]
    assert figures["wrong masks"]["mask_map"] == 0.0 and figures["wrong masks"]["map"] == 1.0
    assert figures["nothing"]["mask_map"] == 0.0 == figures["nothing"]["mask_mar_100"]
    assert [r["mask_ap"] for r in figures["nothing"]["per_class"]] == [0.0, 0.0]


def test_a_split_sweep_ranks_the_freeze_points_by_mask_map(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two jobs (Hydra multirun): the leaderboard ranks them by val/mask_map with the
    instance scores' columns, each figure its job's."""
    result = run_cli("-m", "recipe=digits_instances", *TINY, "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", "freeze.train_from=backbone.fpn,rpn",
                     "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = ranked_leaderboard(sweep, "val/mask_map", capsys)
    assert "val_map" in rows[0] and len(rows) == 2
    for row in rows:  # the boxes' figure is its job's too
        job = read_json(sweep / row["job"] / "metrics.json")
        assert float(row["val_map"]) == pytest.approx(job["val/map"], abs=1e-4)
    assert {r["train_from"] for r in rows} == {"backbone.fpn", "rpn"}


def test_a_predicted_mask_is_its_pixels_above_one_half() -> None:
    """What validation measures of Mask R-CNN's mask probabilities: the pixels above 0.5 (as
    predict writes and evaluate measures them); output without masks passes unchanged."""
    probabilities = torch.tensor([[[[0.2, 0.5, 0.51, 0.9]]], [[[0.6, 0.0, 1.0, 0.49]]]])
    boxes = {"boxes": torch.zeros(2, 4), "labels": torch.ones(2, dtype=torch.long)}
    found = InstanceSegmentation().metric_found([{**boxes, "masks": probabilities}, boxes])
    assert found[0]["masks"].tolist() == [[[False, False, True, True]],
                                          [[True, False, True, False]]]
    assert found[1] is boxes


def _masked(found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**found, "masks": found["masks"][:, 0] > 0.5}


def _diagonal(x: int, y: int, side: int) -> np.ndarray:
    mask = np.zeros((20, 20), dtype=bool)
    mask[range(y, y + side), range(x, x + side)] = True  # the square's box, 1/side of it
    return mask


MASK_TRUTH = _objects([_square(1, 1, 6), _square(10, 10, 8)], [1, 2])


@pytest.mark.parametrize(("found", "on_masks", "on_boxes"), [
    (_objects([_square(1, 1, 6), _square(10, 10, 8)], [1, 2], [0.9, 0.8]), (0, 0), (0, 0)),
    (_objects([_square(1, 1, 6), _square(10, 10, 8)], [2, 2], [0.9, 0.8]), (1, 1), (1, 1)),
    # the right box, the wrong pixels: a mistake on masks only
    (_objects([_diagonal(1, 1, 6), _square(10, 10, 8)], [1, 2], [0.9, 0.8]), (1, 1), (0, 0)),
    (_objects([_square(1, 1, 6), _square(10, 10, 8)], [1, 2], [0.9, 0.3]), (1, 0), (1, 0)),
    (_objects([_square(1, 1, 6), _square(1, 1, 6), _square(10, 10, 8)], [1, 1, 2],
              [0.9, 0.8, 0.7]), (0, 1), (0, 1)),  # a duplicate: one false
    (_objects([], [], []), (2, 0), (2, 0)),  # nothing found
])
def test_mask_mistakes_count_every_case_of_the_matching_rule(
        found: dict[str, torch.Tensor], on_masks: tuple[int, int],
        on_boxes: tuple[int, int]) -> None:
    """The worst images of an instance run count mistakes on masks: the rule of the boxes'
    (class, score, best overlap first, one match each) with the masks' IoU."""
    assert mistakes(_masked(found), _masked(MASK_TRUTH), on="masks") == on_masks
    assert mistakes(found, MASK_TRUTH) == on_boxes
    # as evaluation counts an image, keeping the masks it shows
    counted = image_mask_mistakes(0, _masked(found), _masked(MASK_TRUTH))
    assert (counted.missed, counted.false) == on_masks
    empty = _masked(_objects([], []))
    assert mistakes(_masked(found), empty, on="masks") == (
        0, int((found["scores"] >= SHOWN_SCORE).sum()))


def test_mask_iou_is_the_pixels_shared_over_the_pixels_covered() -> None:
    a = torch.from_numpy(np.stack([_square(0, 0, 4), _square(0, 0, 2), np.zeros((20, 20),
                                                                                bool)]))
    b = torch.from_numpy(np.stack([_square(2, 0, 4), np.zeros((20, 20), bool)]))
    assert mask_iou(a, b).flatten().tolist() == pytest.approx([8 / 24, 0, 0, 0, 0, 0])


def test_the_worst_images_kept_while_streaming_are_the_worst_of_all() -> None:
    """Kept batch by batch, at most `shown` at a time, the worst images are those a sort of
    every image gives: most mistakes first, the earlier image first among equals, none
    without a mistake."""
    counts = [(0, 0), (2, 1), (0, 1), (3, 0), (1, 2), (0, 0), (1, 0), (0, 3), (2, 2), (1, 1)]
    images = [MaskMistakes(i, m, f, torch.zeros(0, 4, 4, dtype=torch.bool),
                           torch.zeros(0, 4, 4, dtype=torch.bool))
              for i, (m, f) in enumerate(counts)]
    everything = sorted((i for i, (m, f) in enumerate(counts) if m + f),
                        key=lambda i: (-sum(counts[i]), i))
    for shown in (1, 3, 5, 20):
        kept: list[MaskMistakes] = []
        for start in range(0, len(images), 3):
            kept = worst_so_far(kept, images[start:start + 3], shown)
            assert len(kept) <= shown
        assert [m.index for m in kept] == everything[:shown]


def test_the_worst_images_are_counted_on_masks_and_drawn_with_them(
        instance_run: tuple[Path, Path]) -> None:
    """An instance run's evaluation ranks its images by mask mistakes — the counts of each
    image recounted one by one from the model's own masks — and draws the masks: what the
    masks change in a thumbnail lies inside them, green where only a true mask is, red where
    only a found one is."""
    run, _ = instance_run
    model = finetune.load(run, device="cpu")
    classes = ["5", "6", "7", "8", "9"]
    canvases = digit_canvases(8, size=64, digits=[5, 6, 7, 8, 9], per_canvas=(1, 3),
                              scales=(3, 4), seed=9, start=160)
    dataset = BoxDataset(canvas_items(canvases, classes), box_transform(False), masks=True)
    result, outputs = evaluate_boxes(model, dataset, classes)
    assert result["match"]["on"] == "masks"
    recount = []
    with torch.inference_mode():
        for index in range(len(dataset)):
            image, truth = dataset[index]
            found = model([image])[0]
            recount.append((index, *mistakes(_masked(found), {**truth, "masks": truth[
                "masks"].bool()}, on="masks")))
    recount = sorted((r for r in recount if r[1] + r[2]), key=lambda r: (-(r[1] + r[2]), r[0]))
    assert recount, "the tiny model makes mask mistakes"
    assert [(w["item"], w["missed"], w["false"]) for w in result["worst"]] == [
        (outputs.items[i], missed, false) for i, missed, false in recount[:8]]
    checked = 0
    for kept in outputs.worst_masks:
        boxes = found_boxes(outputs.found[kept.index], classes, SHOWN_SCORE)
        truth = [{"box": b.tolist()} for b in outputs.targets[kept.index]["boxes"]]
        assert len(kept.found) == len(boxes) and len(kept.truth) == len(truth)
        pictures = [np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",")[1]))),
                               dtype=np.int32)
                    for uri in (thumbnail(dataset, kept.index, boxes, truth, kept),
                                thumbnail(dataset, kept.index, boxes, truth))]
        changed = (pictures[0] != pictures[1]).any(-1)
        size = pictures[0].shape[:2]
        assert max(size) == THUMBNAIL

        def scaled(masks: torch.Tensor, size: tuple[int, ...] = size) -> np.ndarray:
            if not len(masks):
                return np.zeros(size, dtype=bool)
            return torch.nn.functional.interpolate(masks[None].float(), size=size)[0].bool(
                ).any(0).numpy()

        true_px, found_px = scaled(kept.truth), scaled(kept.found)
        assert not (changed & ~(true_px | found_px)).any()
        only_true, only_found = changed & true_px & ~found_px, changed & found_px & ~true_px
        red, green = pictures[0][..., 0], pictures[0][..., 1]
        assert (green[only_true] > red[only_true]).all()
        assert (red[only_found] > green[only_found]).all()
        checked += int(only_true.any()) + int(only_found.any())
    assert checked, "some thumbnail showed a true or a found mask alone"
