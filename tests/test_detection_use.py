"""Using a detection run dir: load rebuilds the detector from its manifest, predict writes
boxes (CSV, JSON, drawn images), evaluate measures it on its own or any labelled box data
(classes matched by name), the report shows AP per class, the PR curve and the worst
images, and export to TorchScript and ONNX is checked on boxes and scores."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune.commands.evaluate import evaluate_run
from finetune.commands.export import export
from finetune.compose import gate
from finetune.data.canvases import digit_canvases, write_canvases
from finetune.errors import FinetuneError
from finetune.models.detectors import LABEL_OFFSET
from finetune.rundir import box_evaluation
from finetune.rundir.box_evaluation import BoxOutputs, box_metrics, mistakes
from finetune.rundir.box_inference import predict_boxes
from tests.conftest import main_here, read_json

TINY = ["recipe=digits_detection", "weights.source=none", "trainer.max_epochs=2",
        "trainer.limit_train_batches=3", "data.canvases.count=24", "data.canvases.size=64",
        "data.batch_size=4", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, a COCO folder of other canvases of the digits 6 and 8 only)."""
    root = tmp_path_factory.mktemp("detection_use")
    result = finetune.train("digits_detection", TINY[1:], run_dir=root / "run")
    canvases = digit_canvases(6, size=64, digits=[6, 8], per_canvas=(1, 2), scales=(3, 4),
                              seed=5, start=150)
    coco = write_canvases(root / "other", canvases, "coco")
    return result.run_dir, coco


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "received"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def test_load_rebuilds_the_detector_from_its_manifest(detection_run: tuple[Path, Path]
                                                      ) -> None:
    run, _ = detection_run
    model = finetune.load(run)
    assert type(model).__name__ == "FasterRCNN" and not model.training
    saved = load_file(str(run / "model.safetensors"))
    assert sorted(model.state_dict()) == sorted(saved)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # the detector's own resizing module is kept (not replaced by a classifier's transform)
    assert type(model.transform).__name__ == "GeneralizedRCNNTransform"


def test_evaluate_on_its_own_val_gives_the_runs_figures(detection_run: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """The same boxes measured twice: in training (the LightningModule's metric) and by
    evaluate on the same validation canvases; evaluation.json (written after training for
    the report) holds them too, and AP@0.5 per class averages to mAP@0.5."""
    run, _ = detection_run
    metrics = read_json(run / "metrics.json")
    result, path = evaluate_run(_copy(run, tmp_path))
    assert result["split"] == "val" and result["images"] == metrics["val_images"]
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert result[key] == pytest.approx(metrics[f"val/{key}"], abs=1e-6), key
    saved = read_json(run / "evaluation.json")["val"]
    assert saved["map"] == result["map"] and saved["per_class"] == result["per_class"]
    assert saved["pr_curve_png"].startswith("data:image/png;base64,")
    seen = [c["ap_50"] for c in result["per_class"] if c["ap_50"] is not None]
    assert sum(seen) / len(seen) == pytest.approx(result["map_50"], abs=1e-4)
    assert sum(c["boxes"] for c in result["per_class"]) == result["boxes"]
    assert (path.parent / "eval_pr_curve.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_other_box_data_matches_classes_by_name(detection_run: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """COCO data holding only the digits 6 and 8 (its own category ids 1 and 2): their true
    boxes are counted under the run's classes 6 and 8, the other classes have none."""
    run, coco = detection_run
    result, path = evaluate_run(run, ["data=coco", f"data.root={coco}"], output=tmp_path)
    annotations = json.loads(coco.read_text())
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    expected = {name: sum(names[a["category_id"]] == name for a in annotations["annotations"])
                for name in ("5", "6", "7", "8", "9")}
    assert {c["class"]: c["boxes"] for c in result["per_class"]} == expected
    assert expected["6"] and expected["8"] and result["split"] == "all"
    with open(path.parent / "eval_predictions.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == box_evaluation.HEADER
    assert all(r[1] in {"5", "6", "7", "8", "9"} for r in rows[1:])


@pytest.mark.parametrize(("args", "said"), [
    (["split=test"], "no test split"),
    (["calibrate=true"], "for a classifier's probabilities"),
    (["tta=flip"], "for a classifier's probabilities"),
    (["data=imagefolder", "data.root=/nowhere"], "holds class labels"),
])
def test_evaluate_refuses_what_a_detector_cannot_take(
        detection_run: tuple[Path, Path], args: list[str], said: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = detection_run
    code, _, err = main_here("evaluate", f"run={run}", "output=/tmp/unused-eval", *args,
                             capsys=capsys)
    assert code == 2 and said in err and "Traceback" not in err, err


def test_predict_writes_boxes_as_csv_json_and_drawn_images(
        detection_run: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run, coco = detection_run
    images = coco.parent / "images"
    output = tmp_path / "boxes.csv"
    code, _, err = main_here("predict", f"run={run}", f"input={images}",
                               f"output={output}", "min_score=0", f"draw={tmp_path / 'drawn'}",
                               capsys=capsys)
    assert code == 0, err
    found = json.loads((tmp_path / "boxes.json").read_text())
    assert [Path(i["path"]).name for i in found["images"]] == sorted(
        p.name for p in images.iterdir())
    with open(output, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "class", "score", "x1", "y1", "x2", "y2"]
    assert len(rows) - 1 == sum(len(i["boxes"]) for i in found["images"]) > 0
    for row in rows[1:]:
        x1, y1, x2, y2 = map(float, row[3:])
        assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64 and row[1] in found["classes"]
    drawn = sorted((tmp_path / "drawn").iterdir())
    assert len(drawn) == len(found["images"])
    with Image.open(drawn[0]) as picture:
        assert picture.size == (64, 64)
    # the same boxes as the detector finds on the same pixels in this process
    model = finetune.load(run)
    again = predict_boxes(model, sorted(images.iterdir()), min_score=0.0)
    assert [r["boxes"] for r in again.rows] == [i["boxes"] for i in found["images"]]
    strict = predict_boxes(model, sorted(images.iterdir()), min_score=0.5)
    assert all(b["score"] >= 0.5 for r in strict.rows for b in r["boxes"])


@pytest.mark.parametrize(("args", "said"), [
    (["tta=flip"], "test-time augmentation averages a classifier's logits"),
    (["min_score=2"], "a score threshold is in [0, 1]"),
])
def test_predict_refuses_what_a_detector_cannot_take(
        detection_run: tuple[Path, Path], tmp_path: Path, args: list[str], said: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run, coco = detection_run
    code, _, err = main_here("predict", f"run={run}", f"input={coco.parent / 'images'}",
                             f"output={tmp_path / 'p.csv'}", *args, capsys=capsys)
    assert code == 2 and said in err and "Traceback" not in err, err
    assert not (tmp_path / "p.csv").exists()


def test_drawn_images_never_go_through_a_planted_link(
        detection_run: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run, coco = detection_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "drawn").symlink_to(elsewhere)
    code, _, err = main_here("predict", f"run={run}", f"input={coco.parent / 'images'}",
                             f"output={tmp_path / 'p.csv'}", f"draw={tmp_path / 'drawn'}",
                             capsys=capsys)
    assert code == 2 and "symbolic link" in err, err
    assert not list(elsewhere.iterdir())
    (tmp_path / "file").write_text("x")
    code, _, err = main_here("predict", f"run={run}", f"input={coco.parent / 'images'}",
                             f"output={tmp_path / 'q.csv'}", f"draw={tmp_path / 'file'}",
                             capsys=capsys)
    assert code == 2 and "is a file" in err and not (tmp_path / "q.csv").exists(), err


def test_the_report_shows_ap_per_class_the_pr_curve_and_the_worst_images(
        detection_run: tuple[Path, Path]) -> None:
    run, _ = detection_run
    page = (run / "report.html").read_text()
    for part in ('id="ap-per-class"', 'id="pr-curve"', 'id="worst"', "mAP@0.5",
                 "Validated only: val/map", "most missed and false boxes",
                 "a found box matches a true one of its class at IoU"):
        assert part in page, part
    assert read_json(run / "evaluation.json")["val"]["match"]["on"] == "boxes"
    assert 'id="calibration"' not in page and "accuracy" not in page.split("<section")[0]
    worst = read_json(run / "evaluation.json")["val"]["worst"]
    counts = [w["missed"] + w["false"] for w in worst]
    assert counts == sorted(counts, reverse=True) and all(c > 0 for c in counts)
    assert all(w["thumbnail"].startswith("data:image/png;base64,") for w in worst)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_is_checked_on_boxes_and_scores(detection_run: tuple[Path, Path],
                                               tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        pytest.skip("the onnx extra is not installed")
    run, _ = detection_run
    info = export(run, fmt, tmp_path)
    assert info["task"] == "detection" and info["class_names"] == ["5", "6", "7", "8", "9"]
    if importlib.util.find_spec("onnxruntime") is not None or fmt == "torchscript":
        assert info["parity_boxes_compared"] > 0
        assert info["parity_max_box_diff"] <= info["tolerance"]["boxes"]
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(3))
    model = finetune.load(run, device="cpu")
    with torch.inference_mode():
        want = model([image])[0]
    if fmt == "torchscript":
        loaded = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
        with torch.inference_mode():
            got = loaded([image])[1][0]
        assert torch.equal(got["labels"], want["labels"])
        assert torch.allclose(got["boxes"], want["boxes"], atol=1e-3)


def _found(*rows: tuple[float, float, float, float, int, float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([r[4] for r in rows], dtype=torch.long),
            "scores": torch.tensor([r[5] for r in rows], dtype=torch.float32)}


TRUE = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]),
        "labels": torch.tensor([1, 2])}


@pytest.mark.parametrize(("found", "expected"), [
    (_found((0, 0, 10, 10, 1, 0.9), (20, 20, 30, 30, 2, 0.8)), (0, 0)),  # both right
    (_found((0, 0, 10, 10, 2, 0.9), (20, 20, 30, 30, 2, 0.8)), (1, 1)),  # a wrong class
    (_found((0, 0, 10, 10, 1, 0.9), (26, 26, 36, 36, 2, 0.8)), (1, 1)),  # IoU below 0.5
    (_found((0, 0, 10, 10, 1, 0.9), (20, 20, 30, 30, 2, 0.3)), (1, 0)),  # below min_score
    (_found((0, 0, 10, 10, 1, 0.9), (0, 0, 10, 10, 1, 0.8), (20, 20, 30, 30, 2, 0.7)),
     (0, 1)),  # a duplicate: one false
    (_found(), (2, 0)),  # nothing found
])
def test_mistakes_count_every_case_of_the_matching_rule(
        found: dict[str, torch.Tensor], expected: tuple[int, int]) -> None:
    assert mistakes(found, TRUE) == expected


def test_mistakes_of_an_image_without_true_boxes_are_its_found_boxes() -> None:
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    assert mistakes(_found((0, 0, 10, 10, 1, 0.9)), empty) == (0, 1)
    assert mistakes(_found(), empty) == (0, 0)


def test_ap_per_class_is_the_metrics_own_and_absent_classes_have_none() -> None:
    """Two classes of three in the data: AP and recall per class are MeanAveragePrecision's,
    a perfect class has AP 1, the class with no true box has None, and its PR curve is left
    out."""
    perfect = _found((0, 0, 10, 10, 1, 0.9))
    half = _found((20, 20, 30, 30, 2, 0.9), (50, 50, 60, 60, 2, 0.8))
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])},
             {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0], [70.0, 70.0, 80.0, 80.0]]),
              "labels": torch.tensor([2, 2])}]
    result = box_metrics(BoxOutputs([perfect, half], truth, ["a", "b"]), ["x", "y", "z"])
    rows = {r["class"]: r for r in result["per_class"]}
    assert rows["x"]["ap"] == 1.0 and rows["x"]["ap_50"] == 1.0 and rows["x"]["boxes"] == 1
    assert 0 < rows["y"]["ap_50"] < 1 and rows["y"]["recall"] == 0.5 and rows["y"]["boxes"] == 2
    assert rows["z"] == {"class": "z", "ap": None, "ap_50": None, "recall": None, "boxes": 0}
    assert set(result["pr_curve"]["precision"]) == {"x", "y"}
    assert result["images"] == 2 and result["boxes"] == 3
    assert LABEL_OFFSET == 1  # the classes above are the detector's labels 1, 2, 3


def test_a_manifests_nested_classifier_arguments_pass_the_gate(
        detection_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A detector on a classifier records the classifier's builder arguments inside its own:
    a received manifest cannot make either builder load weights by itself."""
    run, _ = detection_run
    manifest = read_json(run / "manifest.json")
    assert gate.manifest_model_problems(manifest, "run") == []
    for where in ("classifier", None):
        changed = json.loads(json.dumps(manifest))
        kwargs = changed["model"]["build_kwargs"]
        (kwargs["classifier"] if where else kwargs)["weights"] = "IMAGENET1K_V1"
        problems = gate.manifest_model_problems(changed, "run")
        assert any("would load weights by itself" in p for p in problems), problems
    copy = _copy(run, tmp_path)
    changed = read_json(copy / "manifest.json")
    changed["model"]["build_kwargs"]["classifier"]["weights"] = "IMAGENET1K_V1"
    (copy / "manifest.json").write_text(json.dumps(changed))
    with pytest.raises(FinetuneError, match="would load weights by itself"):
        finetune.load(copy)


def test_the_python_api_predicts_boxes_for_a_detection_run(detection_run: tuple[Path, Path]
                                                           ) -> None:
    run, coco = detection_run
    found = finetune.predict(run, coco.parent / "images")
    assert len(found.rows) == 6 and found.min_score == 0.5
    assert all(b["score"] >= 0.5 for r in found.rows for b in r["boxes"])
    with pytest.raises(FinetuneError, match="test-time augmentation"):
        finetune.predict(run, coco.parent / "images", tta="flip")


def test_parity_pairs_boxes_of_equal_score_and_catches_a_moved_box(
        detection_run: tuple[Path, Path]) -> None:
    """The export check on boxes: the same boxes in another order pass; a box moved by more
    than the tolerance, another class or a missing box fail, and nothing passes silently."""
    from finetune.rundir.detector_export import BOX_TOLERANCE, paired, parity

    want = _found((0, 0, 10, 10, 1, 0.5), (20, 20, 30, 30, 1, 0.5), (5, 5, 9, 9, 2, 0.4))
    swapped = {k: v[[1, 0, 2]] for k, v in want.items()}
    assert paired(want, swapped) == (0.0, 0.0, 0.0)
    moved = {k: v.clone() for k, v in want.items()}
    moved["boxes"][0, 0] += 1.0
    assert paired(want, moved)[0] == pytest.approx(1.0)
    relabelled = {k: v.clone() for k, v in want.items()}
    relabelled["labels"][2] = 1
    assert paired(want, relabelled) == (float("inf"), float("inf"), float("inf"))
    run, _ = detection_run
    model = finetune.load(run, device="cpu")

    def same(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return model(images)

    def shifted(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{**f, "boxes": f["boxes"] + 2 * BOX_TOLERANCE} for f in model(images)]

    checked = parity(model, same, "torchscript")
    assert checked["parity_boxes_compared"] > 0 and checked["parity_max_box_diff"] == 0.0
    with pytest.raises(FinetuneError, match="boxes differ by up to"):
        parity(model, shifted, "torchscript")
