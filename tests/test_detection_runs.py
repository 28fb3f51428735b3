"""task: detection from a recipe: the plan reads and checks box data, builds the detector
(a classifier's weights under backbone.body, or torchvision's detector by name with its
class layers new), freezes by the detector's own paths, and the real Trainer fits it; a
finished run writes mAP, AP per class, box predictions and its manifest. Bad input is one
sentence per problem, all at once, before anything trains."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import trust_weights_file
from safetensors.torch import load_file

import finetune
from finetune.compose.prepare import compose_config
from finetune.data.canvases import digit_canvases, write_canvases
from finetune.tasks.detection import MAP_METRICS
from finetune.training.plan import plan_run

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
        "data.canvases.count=24", "data.canvases.size=64", "data.batch_size=4",
        "trainer.enable_progress_bar=false"]
SOURCE_TINY = ["weights.recipe_overrides=['trainer.max_epochs=1','trainer.limit_train_batches=2',"
               "'trainer.limit_val_batches=1']"]


def _problems(*overrides: str) -> list[str]:
    cfg, _ = compose_config(["recipe=digits_detection", "weights.source=none", *overrides])
    return plan_run(cfg, load=False).problems


def test_digits_detection_trains_from_the_classifier_and_writes_its_run(tmp_path: Path) -> None:
    """The recipe's source classifier (digits_source, trained first) loads into the
    detector's backbone.body; freeze.train_from=backbone.fpn keeps it as loaded while the
    FPN and heads train; metrics.json has every mAP figure, AP per class and the headline's
    best; val_predictions.csv has boxes of the data's classes inside the canvas."""
    result = finetune.train("digits_detection", [*TINY, *SOURCE_TINY,
                                                 "freeze.train_from=backbone.fpn"],
                            run_dir=tmp_path / "run")
    metrics = result.metrics
    assert metrics["status"] == "complete" and metrics["task"] == "detection"
    assert all(0.0 <= metrics[k] <= 1.0 for k in MAP_METRICS), metrics
    assert metrics["best/val/map"] == metrics["val/map"] and metrics["best/epoch"] == 0
    assert set(metrics["val/ap_per_class"]) <= {"5", "6", "7", "8", "9"}
    assert metrics["feature_cache"]["status"] == "off"
    report = json.loads((result.run_dir / "load_report.json").read_text())
    assert len(report["loaded"]) == 120  # every ResNet-18 tensor but its classifier
    source_dir = Path(report["path"]).parent
    source = load_file(source_dir / "model.safetensors")
    trained = load_file(result.run_dir / "model.safetensors")
    body = {k.removeprefix("backbone.body."): v for k, v in trained.items()
            if k.startswith("backbone.body.")}
    assert body and all(torch.equal(v, source[k]) for k, v in body.items())  # frozen, as loaded
    assert any(k.startswith("roi_heads.box_predictor.") for k in trained)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["task"] == "detection"
    assert manifest["head"]["paths"] == ["roi_heads.box_predictor"]
    assert manifest["class_names"] == ["5", "6", "7", "8", "9"]
    with open(result.run_dir / "val_predictions.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["item", "predicted", "score", "x1", "y1", "x2", "y2"]
    for row in rows[1:]:
        assert row[1] in manifest["class_names"] and 0 <= float(row[2]) <= 1
        assert all(-1 <= float(v) <= 65 for v in row[3:])
    loaded = finetune.load(result.run_dir)  # rebuilt from its manifest, weights strict
    assert type(loaded).__name__ == "FasterRCNN" and loaded.class_names == ["5", "6", "7", "8",
                                                                          "9"]


def test_a_torchvision_detector_by_name_loads_its_coco_weights(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """ssdlite320's COCO entry read from torch's cache (a file we made, trusted as a user's
    own): every tensor loads but the class-sized convs, which are the data's size and new."""
    home = tmp_path / "torch"
    entry = torchvision.models.get_model_weights("ssdlite320_mobilenet_v3_large").DEFAULT
    path = home / "hub" / "checkpoints" / Path(entry.url).name
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None,
                                            weights_backbone=None).state_dict(), path)
    trust_weights_file(path)
    monkeypatch.setenv("TORCH_HOME", str(home))
    cfg, _ = compose_config(["recipe=digits_detection", "model.name=ssdlite320_mobilenet_v3_large",
                             "weights.source=torchvision", "model.detector.levels=[]",
                             "data.classes=[1,2]"])
    plan = plan_run(cfg)
    assert plan.problems == []
    report = plan.built.report
    assert plan.built.head_paths == ["head.classification_head.module_list"]
    skipped = [s["key"] for s in report.shape_skipped]
    assert report.loaded and all(k.startswith("head.classification_head.") for k in skipped)
    assert len(skipped) == 12  # six levels' weight and bias
    assert report.missing == []  # the rest, the depthwise convs of the class head too, loaded


def test_the_seeds_vgg16_recipe_is_one_map_under_faster_rcnn(tmp_path: Path) -> None:
    """fasterrcnn_vgg16_relu5_3 on box_csv data (random weights; its ImageNet features load
    in test_recipes' inspect): vgg16 cut to relu5_3 is one 512-channel map with 15 anchors
    per location; conv1-conv3 (features.0-16) frozen by the detector's path
    backbone.body.features.17 and still as built after a training step."""
    root = write_canvases(tmp_path / "boxes", digit_canvases(6, size=64, digits=[3, 8]),
                          "box_csv")
    overrides = ["data=box_csv", f"data.root={root}", "weights.source=none",
                 "weights.require=[]", "data.image_size=64"]
    cfg, _ = compose_config(["recipe=fasterrcnn_vgg16_relu5_3", *overrides])
    plan = plan_run(cfg, load=False)
    assert plan.problems == [] and plan.class_names == ["3", "8"]
    model = plan.built.model
    assert model.backbone.out_channels == 512
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    frozen = {n.split(".")[3] for n, p in model.named_parameters()
              if n.startswith("backbone.body.") and not p.requires_grad}
    assert frozen == {"0", "2", "5", "7", "10", "12", "14"}  # conv1_1 .. conv3_3
    result = finetune.train("fasterrcnn_vgg16_relu5_3", [
        *overrides, "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "data.num_workers=0", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "run")
    assert result.metrics["status"] == "complete"
    trained = load_file(result.run_dir / "model.safetensors")
    built = plan.built.model.state_dict()  # the same seed builds the same start
    assert torch.equal(trained["backbone.body.features.0.weight"],
                       built["backbone.body.features.0.weight"])
    assert not torch.equal(trained["backbone.body.features.28.weight"],
                           built["backbone.body.features.28.weight"])


def test_every_problem_of_a_detection_recipe_is_one_sentence_at_once() -> None:
    problems = _problems("head.num_classes=3", "loss.label_smoothing=0.1",
                         "data.sampler=balanced", "freeze.train_from=backbone.nothing")
    text = "\n".join(problems)
    assert "loss.label_smoothing=0.1: not taken with task=detection" in text
    assert "data.sampler=balanced: not taken with task=detection" in text
    assert "head.num_classes=3, but data.classes names 5 digits" in text
    # the model (and its freeze selectors) is checked once the data is
    assert _problems("freeze.train_from=backbone.nothing")[0].startswith("freeze.train_from")


def test_a_classifier_left_whole_has_no_map_for_a_detector() -> None:
    problems = _problems("model.detector.levels=[]")
    assert len(problems) == 1 and "is not a feature map" in problems[0], problems


@pytest.mark.parametrize("overrides,expected", [
    (["task=multiclass", "metric=val/acc"], "data=digit_canvases holds boxes, which "
                                            "task=multiclass does not read"),
    (["data=digits"], "task=detection reads boxes, and data=digits holds class labels"),
    (["metric=val/acc"], "metric=val/acc: not measured with task=detection"),
    (["model.name=fasterrcnn_resnet50_fpn", "surgery=[{op: remove, path: rpn}]"],
     "surgery: changes a classifier before it becomes a detector's backbone"),
])
def test_a_mismatch_of_task_data_and_model_is_one_sentence(overrides: list[str],
                                                           expected: str) -> None:
    problems = _problems(*overrides)
    assert any(p.startswith(expected) for p in problems), problems


def test_annotation_problems_stop_the_plan_all_at_once(tmp_path: Path) -> None:
    """A COCO file whose boxes reach outside and name an unknown category, and a YOLO folder
    with no names: each problem named, none trains."""
    root = tmp_path / "coco"
    path = write_canvases(root, digit_canvases(4, size=64, digits=[1, 2]), "coco")
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [50, 50, 40, 40]
    data["annotations"][1]["category_id"] = 99
    path.write_text(json.dumps(data))
    problems = _problems("data=coco", f"data.root={path}", "data.classes=null")
    assert any("reach outside their image" in p for p in problems), problems
    assert any("class id 99" in p for p in problems), problems
    empty = tmp_path / "yolo"
    write_canvases(empty, digit_canvases(3, size=64, digits=[1]), "yolo")
    (empty / "data.yaml").unlink()
    problems = _problems("data=yolo", f"data.root={empty}", "data.classes=null")
    assert len(problems) == 1 and "has no data.yaml with `names`" in problems[0], problems


def test_canvases_validate_on_digit_images_training_never_saw() -> None:
    """data=digit_canvases: every digit pasted on a validation canvas is one of its digit's
    images after the first CANVAS_TRAIN_IMAGES, every training one among those."""
    import numpy as np
    from sklearn.datasets import load_digits

    from finetune.data.box_formats import CANVAS_TRAIN_IMAGES, DigitCanvases

    cfg, _ = compose_config(["recipe=digits_detection", "data.canvases.count=40"])
    train, val = DigitCanvases().canvases(cfg.data, 0, cfg.data.val_fraction)
    assert (len(train), len(val)) == (27, 13)
    bunch = load_digits()
    rank = {}  # each glyph's ink as pasted (scaled, trimmed) -> its place among its digit's
    for digit in range(10):
        for place, i in enumerate(np.flatnonzero(bunch.target == digit)):
            for scale in cfg.data.canvases.scales:
                ink = np.kron(np.round(bunch.images[i] * 255 / 16).astype(np.uint8),
                              np.ones((scale, scale), dtype=np.uint8))
                rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
                ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
                rank.setdefault((ink.shape, ink.tobytes()), set()).add(place)
    for canvases, seen in ((train, lambda p: p < CANVAS_TRAIN_IMAGES),
                           (val, lambda p: p >= CANVAS_TRAIN_IMAGES)):
        for canvas in canvases:
            for x1, y1, x2, y2, _ in canvas.boxes:
                crop = canvas.pixels[y1:y2, x1:x2]
                places = rank[(crop.shape, crop.tobytes())]
                assert any(seen(p) for p in places)


def test_a_weights_problem_is_a_plan_problem(tmp_path: Path) -> None:
    """A weights file that cannot satisfy weights.require is one sentence in the plan's
    problems (what inspect and recipes validate list), not an exception out of it."""
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    problems = _problems("weights.source=file", f"weights.path={path}",
                         "weights.require=[nothing.*]")
    assert problems == [] or any(p.startswith("weights.require: 'nothing.*'") for p in problems)
    cfg, _ = compose_config(["recipe=digits_detection", "weights.source=file",
                             f"weights.path={path}", "weights.require=[nothing.*]"])
    plan = plan_run(cfg)
    assert len(plan.problems) == 1 and plan.problems[0].startswith(
        "weights.require: 'nothing.*' matches no model tensor"), plan.problems


def test_builder_arguments_that_load_or_do_not_exist_are_one_sentence() -> None:
    problems = _problems("model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
                         "model.detector.levels=[]", "model.kwargs.weights_backbone=DEFAULT")
    assert any(p.startswith("model.kwargs.weights_backbone: the builder would load weights by "
                            "itself") for p in problems), problems
    problems = _problems("model.detector.kwargs.box_batch_size_per_imag=64")
    assert problems == ["model.detector.kwargs.box_batch_size_per_imag: FasterRCNN takes no "
                        "such argument (it would be ignored); see its torchvision "
                        "documentation for the names"], problems
    problems = _problems("model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
                         "model.detector.levels=[]", "model.kwargs.box_score_thresh=0.1",
                         "model.kwargs.rpn_batch_size=8")
    assert problems == ["model.kwargs.rpn_batch_size: FasterRCNN takes no such argument (it "
                        "would be ignored); see its torchvision documentation for the names"]
    problems = _problems("model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
                         "model.detector.levels=[]", "model.kwargs.trainable_backbone_layers=2")
    assert problems == ["model.kwargs.trainable_backbone_layers: torchvision applies it only "
                        "where its builder loads the weights, and finetune loads them itself; "
                        "freeze with freeze.train_from (e.g. backbone.body.layer3)"]


def test_box_augmentations_unfreezing_and_groups_use_the_detectors_paths(tmp_path: Path
                                                                       ) -> None:
    """Box-aware v2 augmentations are tried on a real image with its boxes at plan time
    (a bad one is one sentence); an unfreeze phase and an optimizer group name the
    detector's own modules."""
    root = write_canvases(tmp_path / "boxes", digit_canvases(6, size=64, digits=[3, 8]),
                          "box_csv")
    data = ["data=box_csv", f"data.root={root}", "data.image_size=64", "data.classes=null"]
    plan_cfg, _ = compose_config([
        "recipe=digits_detection", "weights.source=none", *data,
        "data.augment=[RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop]",
        "freeze.train_from=backbone.fpn",
        "freeze.unfreeze=[{epoch: 2, train_from: backbone.body.layer4}]",
        "optim.groups=[{modules: roi_heads, lr: 0.05, name: heads}]"])
    plan = plan_run(plan_cfg, load=False)
    assert plan.problems == []
    assert [s.epoch for s in plan.freeze.stages] == [0, 2]
    heads = next(g for g in plan.groups if g.name == "heads")
    assert heads.lr == 0.05 and all(n.startswith("roi_heads.") for n in heads.params)
    image, target = plan.data.train_set[(0, 7)]
    assert image.dtype == torch.float32 and target["boxes"].shape[1] == 4
    problems = _problems(*data, "data.augment=[{RandomCrop: {size: 500}}]")
    assert len(problems) == 1 and problems[0].startswith("data.augment: fails on a training "
                                                         "image with its boxes"), problems


def test_the_schemas_box_choices_are_the_readers_and_checks_own() -> None:
    """The schema lists data.box_format and data.empty_images literally (so that config-only
    commands do not import the readers); they stay the values the readers and checks take."""
    from finetune.compose.schema import CHOICES
    from finetune.data.box_checks import EMPTY_POLICIES
    from finetune.data.boxes import BOX_FORMATS

    assert CHOICES["data.box_format"] == BOX_FORMATS
    assert CHOICES["data.empty_images"] == EMPTY_POLICIES


def test_canvases_that_would_exhaust_memory_are_one_sentence() -> None:
    # (just over the bound: were the check gone, making them would still fit this machine)
    problems = _problems("data.canvases.count=17000", "data.canvases.size=256")
    assert problems == ["data.canvases: 17000 canvases of 256x256 px are 1.0 GiB of pixels "
                        "in memory; keep count x size x size under 1 GiB"], problems
    from finetune.data.box_formats import DigitCanvases

    at_most, _ = compose_config(["recipe=digits_detection", "data.canvases.count=16000",
                                 "data.canvases.size=256"])  # just under 1 GiB
    assert DigitCanvases().problems(at_most.data) == []
