"""task=segmentation: the metrics on every case of their rules, the models (a classifier
under each head, torchvision's by name with their weights), the plan's refusals, and runs —
the digits recipe learning from the digits classifier, a frozen encoder left as loaded,
resume equal to the uninterrupted run, predict's masks and overlays, the report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import (
    main_here,
    ranked_leaderboard,
    read_json,
    run_cli,
    train_here,
    trust_weights_file,
)
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune.compose.prepare import compose_config
from finetune.data.canvases import digit_canvases
from finetune.data.masks import canvas_mask
from finetune.models.segmenters import (
    SegmenterProblem,
    build_segmenter,
    class_layers,
    encoder_node,
    segmenter_names,
    segmenter_on,
)
from finetune.rundir.mask_inference import palette
from finetune.tasks.segmentation import IGNORED, Segmentation, image_scores, scores
from finetune.training.plan import plan_run

TINY = ["recipe=digits_segmentation", "weights.source=none", "data.canvases.count=24",
        "data.canvases.size=32", "data.batch_size=4", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"]
# The recipe's source, shortened: the transfer test trains the real one
SOURCE_TINY = ["weights.recipe_overrides=['trainer.max_epochs=1','trainer.limit_train_batches=2',"
               "'trainer.limit_val_batches=1']"]
# val/miou the digits recipe reaches from the digits classifier (docs/segmentation.md: 0.66-0.68
# on 1 and 2 threads, seeds 0-2; from a random encoder 0.63-0.66)
MIOU_FLOOR = 0.55


def _problems(*overrides: str) -> list[str]:
    cfg, _ = compose_config(["recipe=digits_segmentation", "weights.source=none", *overrides])
    return plan_run(cfg, load=False).problems


# -- the metrics ------------------------------------------------------------------------


def test_scores_from_a_pixel_confusion_matrix_on_every_case() -> None:
    """IoU = hits / (truth + predicted - hits); a class neither true nor predicted anywhere
    has none and is left out of the means; one true but never predicted counts 0."""
    perfect = scores(torch.tensor([[5, 0], [0, 3]]))
    assert perfect["miou"] == 1 and perfect["pixel_acc"] == 1 and perfect["dice"] == 1
    matrix = torch.tensor([[6, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2: absent
    found = scores(matrix)
    iou = [6 / (8 + 7 - 6), 3 / (4 + 5 - 3)]
    assert found["iou"][:2].tolist() == pytest.approx(iou) and math.isnan(found["iou"][2])
    assert float(found["miou"]) == pytest.approx(sum(iou) / 2)
    assert float(found["pixel_acc"]) == pytest.approx(9 / 12)
    assert float(found["dice"]) == pytest.approx((12 / 15 + 6 / 9) / 2)
    missed = scores(torch.tensor([[4, 0], [2, 0]]))  # class 1 true, never predicted
    assert missed["iou"].tolist() == pytest.approx([4 / 6, 0.0])
    assert float(missed["miou"]) == pytest.approx(1 / 3)


def test_unlabelled_pixels_count_in_no_loss_and_no_metric() -> None:
    task = Segmentation()
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    hidden = target.clone()
    hidden[:, :2] = IGNORED
    wrong = target.clone()
    wrong[:, :2] = (logits.argmax(1)[:, :2] + 1) % 3  # wrong labels where hidden hides them
    confusion = task.metric_set(3)["confusion"]
    confusion.update(logits, hidden)
    seen = confusion.compute()
    assert int(seen.sum()) == 2 * 2 * 4  # the labelled half only
    kept = target[:, 2:]
    assert torch.allclose(task.loss(logits, hidden),
                          task.loss(logits[:, :, 2:], kept))
    assert torch.equal(image_scores(logits, hidden),
                       image_scores(logits[:, :, 2:], kept))
    assert not torch.equal(image_scores(logits, wrong), image_scores(logits, hidden))
    one = image_scores(logits, target)[0]
    assert one[0] == pytest.approx(float((logits[0].argmax(0) == target[0]).float().mean()))


# -- the models -------------------------------------------------------------------------


@pytest.mark.parametrize("name,node", [("resnet18", "layer4"), ("vgg11", "features"),
                                       ("mobilenet_v3_small", "features")])
@pytest.mark.parametrize("head", ["deeplabv3", "fcn"])
def test_a_classifier_becomes_an_encoder_under_each_head(name: str, node: str, head: str
                                                         ) -> None:
    """auto reads the last map before the classifier pools it; the encoder keeps the
    classifier's names and tensors; the output is a class map at the input's size."""
    classifier = torchvision.models.get_model(name)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    assert encoder_node(classifier, "auto", 64, 3)[0] == node
    model = segmenter_on(classifier, head, "auto", 4, 64).eval()
    out = model(torch.zeros(2, 3, 48, 64))
    assert set(out) == {"out"} and out["out"].shape == (2, 4, 48, 64)
    state = model.state_dict()
    kept = [k for k in before if f"backbone.{k}" in state]
    assert kept and all(torch.equal(state[f"backbone.{k}"], before[k]) for k in kept)
    assert all(k.split(".")[0] in dict(classifier.named_children()) for k in before
               if f"backbone.{k}" not in state)  # only what comes after the node is left out
    assert class_layers(model) == ["classifier.4"]


def test_a_named_node_and_what_cannot_be_one() -> None:
    classifier = torchvision.models.resnet18()
    model = segmenter_on(classifier, "deeplabv3", "layer2", 3, 64)
    assert list(model.backbone.return_layers) == ["layer2"]
    assert not hasattr(model.backbone, "layer3")  # cut after its node
    for node in ("avgpool", "fc", "layer9"):
        with pytest.raises(SegmenterProblem, match=f"model.segmenter.node={node!r} is not a "
                                                  "top-level module that gives a feature map"):
            segmenter_on(torchvision.models.resnet18(), "deeplabv3", node, 3, 64)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1,
                                               num_heads=2, hidden_dim=8, mlp_dim=8)
    with pytest.raises(SegmenterProblem, match="turns its feature map into tokens at "
                                               "'encoder'"):
        segmenter_on(vit, "deeplabv3", "auto", 3, 32)
    assert segmenter_on(vit, "fcn", "conv_proj", 3, 32)  # named: the user's choice
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(SegmenterProblem, match="none of its top-level modules gives a "
                                               "feature map"):
        segmenter_on(flat, "deeplabv3", "auto", 3, 32)


def test_torchvisions_segmentation_models_by_name() -> None:
    assert set(segmenter_names()) == {
        "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101",
        "fcn_resnet50", "fcn_resnet101", "lraspp_mobilenet_v3_large"}
    lraspp = build_segmenter("lraspp_mobilenet_v3_large", 3)
    assert class_layers(lraspp) == ["classifier.low_classifier", "classifier.high_classifier"]
    fcn = build_segmenter("fcn_resnet50", 3, aux_loss=True)
    assert class_layers(fcn) == ["classifier.4", "aux_classifier.4"]
    assert fcn.classifier[4].out_channels == fcn.aux_classifier[4].out_channels == 3


def test_a_torchvision_model_by_name_loads_its_weights(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """lraspp's VOC entry read from torch's cache (a file we made, trusted as a user's own):
    every tensor loads but the class layers, which are the data's size and new."""
    home = tmp_path / "torch"
    entry = torchvision.models.get_model_weights("lraspp_mobilenet_v3_large").DEFAULT
    path = home / "hub" / "checkpoints" / Path(entry.url).name
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None,
                                            weights_backbone=None).state_dict(), path)
    trust_weights_file(path)
    monkeypatch.setenv("TORCH_HOME", str(home))
    cfg, _ = compose_config(["recipe=digits_segmentation", "model.name=lraspp_mobilenet_v3_large",
                             "weights.source=torchvision", "data.classes=[1,2]",
                             "data.canvases.count=8"])
    plan = plan_run(cfg)
    assert plan.problems == [] and plan.class_names == ["background", "1", "2"]
    report = plan.built.report
    skipped = sorted(s["key"] for s in report.shape_skipped)
    assert skipped == [f"classifier.{c}.{p}" for c in ("high_classifier", "low_classifier")
                       for p in ("bias", "weight")]
    assert report.missing == [] and len(report.loaded) > 100
    saved = torch.load(path, weights_only=True)
    state = plan.built.model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in report.loaded)


# -- the plan ---------------------------------------------------------------------------


def test_a_new_pixel_classifier_is_drawn_from_its_own_stream() -> None:
    """Same seed, other classes: the encoder is the same draw, the new head is not (drawn
    from the seed and the class names, so a source's head is never the run's start)."""
    plans = [plan_run(compose_config(["recipe=digits_segmentation", "weights.source=none",
                                      f"data.classes={classes}", "data.canvases.count=8"])[0],
                      load=False) for classes in ("[5,6,7]", "[1,2,3]", "[5,6,7]")]
    states = [p.built.model.state_dict() for p in plans]
    head = "classifier.4.weight"
    assert torch.equal(states[0]["backbone.conv1.weight"], states[1]["backbone.conv1.weight"])
    assert not torch.equal(states[0][head], states[1][head])
    assert torch.equal(states[0][head], states[2][head])  # and it repeats



@pytest.mark.parametrize("override,named", [
    ("head.type=none", "head.type=none"), ("head.hidden=[8]", "head.hidden=[8]"),
    ("head.dropout=0.1", "head.dropout=0.1"),
    ("+loss.class_weights=[1,1,1,1,1,1]", "loss.class_weights"),
    ("data.mix.mixup_alpha=0.2", "data.mix"), ("data.sampler=balanced", "data.sampler=balanced"),
    ("data.test_fraction=0.2", "data.test_fraction=0.2"), ("data.folds=3", "data.folds=3"),
    ("data.limit_per_class={5: 3}", "data.limit_per_class"),
    ("data.uint8_batches=true", "data.uint8_batches=true"),
    ("freeze.cache=true", "freeze.cache=true"),
    ("adapter.type=lora", "adapter.type=lora")])
def test_keys_that_serve_one_label_per_image_are_refused(override: str, named: str) -> None:
    problems = _problems(override)
    assert any(p.startswith(f"{named}") and "not taken with task=segmentation" in p
               for p in problems), problems


@pytest.mark.parametrize("overrides,expected", [
    (["task=multiclass", "metric=val/acc"],
     "data=digit_masks holds masks, which task=multiclass does not read; set "
     "task=segmentation (docs/segmentation.md)"),
    (["data=digits"], "task=segmentation reads masks, and data=digits holds class labels; use "
                      "data=digit_masks | mask_folders | voc_masks"),
    (["task=detection", "metric=val/map"], "data=digit_masks holds masks, which "
                                           "task=detection does not read"),
    (["metric=val/acc"], "metric=val/acc: not measured with task=segmentation"),
    (["head.num_classes=5"], "head.num_classes=5, but data=digit_masks has 6 classes"),
    (["model.name=fcn_resnet50", "surgery=[{op: remove, path: classifier}]"],
     "surgery: changes a classifier before it becomes an encoder"),
    (["model.segmenter.node=fc"], "model.name=resnet18: model.segmenter.node='fc' is not a "
                                  "top-level module that gives a feature map"),
    (["model.name=lraspp_mobilenet_v3_large", "model.kwargs.nope=1"],
     "model.kwargs.nope: lraspp_mobilenet_v3_large takes no such argument"),
])
def test_a_mismatch_of_task_data_and_model_is_one_sentence(overrides: list[str],
                                                           expected: str) -> None:
    problems = _problems(*overrides)
    assert any(p.startswith(expected) for p in problems), problems


def test_the_mask_checks_stop_the_run_with_every_problem(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, value in (("a", 1), ("b", 9)):
        Image.new("L", (8, 8)).save(root / "images" / f"{name}.png")
        Image.new("L", (6, 8), value).save(root / "masks" / f"{name}.png")
    problems = _problems("data=mask_folders", f"data.root={root}", "data.classes=[bg,x]",
                         "data.batch_size=2")
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"data=mask_folders ({root}): 2 mask(s) of another size")
    assert "mask id(s) 9 are not classes" in problems[1]


# -- runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe on its (shortened) source with the encoder frozen: a run dir to use."""
    return train_here("recipe=digits_segmentation", *TINY[2:], *SOURCE_TINY,
                      "freeze.train_from=classifier", "trainer.max_epochs=1",
                      run_dir=tmp_path_factory.mktemp("seg") / "run")


def test_a_frozen_encoder_stays_as_loaded_and_the_run_says_what_it_measured(
        frozen_run: Path) -> None:
    metrics = read_json(frozen_run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["task"] == "segmentation"
    assert all(0 <= metrics[k] <= 1 for k in ("val/miou", "val/pixel_acc", "val/dice"))
    assert metrics["best/val/miou"] == metrics["val/miou"] and metrics["best/epoch"] == 0
    assert list(metrics["val/iou_per_class"]) == ["background", "5", "6", "7", "8", "9"]
    assert metrics["feature_cache"]["status"] == "off"
    report = read_json(frozen_run / "load_report.json")
    assert len(report["loaded"]) == 120  # every ResNet-18 tensor but its classifier
    source = load_file(Path(report["path"]).parent / "model.safetensors")
    trained = load_file(frozen_run / "model.safetensors")
    encoder = {k.removeprefix("backbone."): v for k, v in trained.items()
               if k.startswith("backbone.")}
    assert {k.split(".")[0] for k in encoder} == {"conv1", "bn1", "layer1", "layer2"}
    assert all(torch.equal(v, source[k]) for k, v in encoder.items())  # frozen, as loaded
    rows = list(csv.reader((frozen_run / "val_predictions.csv").read_text().splitlines()))
    assert rows[0] == ["item", "pixel_acc", "miou"] and len(rows) - 1 == metrics["val_images"]
    assert [r[0] for r in rows[1:]] == [f"#{i}" for i in range(metrics["val_images"])]
    manifest = read_json(frozen_run / "manifest.json")
    assert manifest["task"] == "segmentation"
    assert manifest["class_names"] == ["background", "5", "6", "7", "8", "9"]


def test_predict_writes_palette_masks_overlays_and_shares(frozen_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """Masks at each image's own size, as the loaded model decides them (the PNG's palette
    index is the class id); overlays; a row per image whose shares sum to one."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        [canvas] = digit_canvases(1, size=40, digits=[5, 6], seed=4 + i, start=130,
                                  height=24 + 8 * i)
        Image.fromarray(canvas.pixels).save(images / f"c{i}.png")
    output = tmp_path / "out" / "predictions.csv"
    output.parent.mkdir()
    code, out, err = main_here("predict", f"run={frozen_run}", f"input={images}",
                               f"output={output}", f"draw={tmp_path / 'drawn'}", capsys=capsys)
    assert code == 0, err
    assert "2 masks in" in out and "2 overlays in" in out
    rows = list(csv.DictReader(output.read_text().splitlines()))
    assert [r["mask"] for r in rows] == ["predictions_masks/c0.png", "predictions_masks/c1.png"]
    model = finetune.load(frozen_run)
    found = finetune.predict(model, [images / "c0.png", images / "c1.png"])
    for i, row in enumerate(rows):
        mask = Image.open(output.parent / row["mask"])
        assert mask.mode == "P" and mask.getpalette()[:9] == palette()[:9]
        ids = np.asarray(mask)
        assert ids.shape == (24 + 8 * i, 40) and np.array_equal(ids, found.rows[i]["mask"])
        shares = [float(row[f"share_{c}"]) for c in model.class_names]
        assert sum(shares) == pytest.approx(1, abs=1e-3)
        assert shares == pytest.approx([float((ids == c).mean()) for c in range(6)], abs=1e-4)
        drawn = Image.open(tmp_path / "drawn" / f"c{i}.png")
        assert drawn.size == (40, 24 + 8 * i) and drawn.mode == "RGB"


def test_the_report_shows_iou_per_class_and_the_worst_images(frozen_run: Path) -> None:
    """The run's own evaluation of its validation split (evaluation.json) agrees with what
    validation logged, and the report shows it: IoU per class, the pixel confusion matrix,
    the worst images beside their true and predicted masks."""
    page = (frozen_run / "report.html").read_text()
    metrics = read_json(frozen_run / "metrics.json")
    [val] = read_json(frozen_run / "evaluation.json").values()
    assert val["miou"] == pytest.approx(metrics["val/miou"], abs=1e-5)
    assert val["images"] == metrics["val_images"]
    assert [c["class"] for c in val["per_class"]] == ["background", "5", "6", "7", "8", "9"]
    for row in val["per_class"]:
        logged = metrics["val/iou_per_class"][row["class"]]
        assert row["iou"] == pytest.approx(logged, abs=1e-5) if logged is not None \
            else row["iou"] is None
    assert len(val["worst"]) == min(6, val["images"])
    assert [w["miou"] for w in val["worst"]] == sorted(w["miou"] for w in val["worst"])
    assert all(w["thumbnail"].startswith("data:image/png;base64,") for w in val["worst"])
    for heading in ("IoU per class", "Confusion matrix (validation pixels)",
                    "Worst images (lowest mIoU)"):
        assert heading in page
    assert f"best val/miou {metrics['best/val/miou']:.4f} at epoch 0" in page


def test_evaluate_measures_other_masks_matched_by_name(frozen_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """A mask folder whose class table names the run's classes in another order: its ids
    are mapped by name; the figures are the confusion matrix's; a class the run lacks is
    one sentence."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = ["6", "background", "5"]  # ids 0, 1, 2 in this folder
    run_index = {"background": 0, "5": 1, "6": 2}
    for i in range(3):
        [canvas] = digit_canvases(1, size=32, digits=[5, 6], seed=20 + i, start=130)
        # the run's ids...
        mask = canvas_mask(canvas.pixels, canvas.boxes, ["background", "5", "6"])
        by_folder = np.vectorize({0: 1, 1: 2, 2: 0}.get)(mask)  # ...as the folder numbers them
        Image.fromarray(canvas.pixels).save(root / "images" / f"{i}.png")
        Image.fromarray(by_folder.astype(np.uint8), mode="L").save(root / "masks" / f"{i}.png")
    out = tmp_path / "eval"
    code, printed, err = main_here("evaluate", f"run={frozen_run}", "data=mask_folders",
                                   f"data.root={root}", f"data.classes=[{','.join(names)}]",
                                   f"output={out}", capsys=capsys)
    assert code == 0, err
    result = read_json(out / "eval.json")
    assert result["images"] == 3 and result["split"] == "all" and "mIoU" in printed
    confusion = torch.tensor(result["confusion"])
    assert result["miou"] == pytest.approx(float(scores(confusion)["miou"]), abs=1e-6)
    truth = confusion.sum(1)  # true pixels per run class: the canvases' own counts
    model = finetune.load(frozen_run)
    size = model.preprocessing.crop
    expected = torch.zeros(6, dtype=torch.int64)
    for i in range(3):
        ids = torch.from_numpy(np.asarray(Image.open(root / "masks" / f"{i}.png"),
                                          dtype=np.int64))
        ids = torch.nn.functional.interpolate(ids[None, None].float(), size=(size, size),
                                              mode="nearest")[0, 0].long()
        for folder_id, name in enumerate(names):
            expected[run_index[name]] += int((ids == folder_id).sum())
    assert torch.equal(truth, expected)
    rows = list(csv.DictReader((out / "eval_predictions.csv").read_text().splitlines()))
    assert [Path(r["item"]).name for r in rows] == ["0.png", "1.png", "2.png"]
    code, _, err = main_here("evaluate", f"run={frozen_run}", "data=mask_folders",
                             f"data.root={root}", "data.classes=[background,5,cat]",
                             f"output={out}", capsys=capsys)
    assert code == 2 and "the class cat is not among the run's 6 classes" in err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_is_checked_on_the_class_maps(frozen_run: Path, tmp_path: Path, fmt: str
                                             ) -> None:
    from finetune.rundir.exporting import export

    info = export(frozen_run, fmt, tmp_path / "out" / "")
    assert info["parity_max_abs_diff"] <= info["tolerance"]
    assert info["parity_pixel_agreement"] == 1.0
    assert info["output_shape"] == ["batch", 6, 32, 32] and info["task"] == "segmentation"
    assert "argmax over the classes" in info["outputs"]
    if fmt == "torchscript":
        loaded = torch.jit.load(info["file"])
        model = finetune.load(frozen_run)
        x = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            assert torch.allclose(loaded(x), model(x)["out"], atol=1e-4)


@pytest.mark.parametrize("name,kwargs", [("lraspp_mobilenet_v3_large", []),
                                         ("fcn_resnet50", ["+model.kwargs.aux_loss=true"])])
def test_a_torchvision_model_by_name_trains(name: str, kwargs: list[str], tmp_path: Path
                                            ) -> None:
    run = train_here(*TINY, f"model.name={name}", *kwargs, "trainer.max_epochs=1",
                     "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                     run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and 0 <= metrics["val/miou"] <= 1
    if kwargs:  # the auxiliary head trained with it (loss.aux_weight)
        assert any(k.startswith("aux_classifier.") for k in load_file(run / "model.safetensors"))


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    phases = ["freeze.train_from=backbone.layer2", "sched.name=cosine", "sched.epochs=2",
              "freeze.unfreeze=[{epoch:1,train_from:backbone.layer1,lr_mult:0.5}]"]
    whole = train_here(*TINY, *phases, "trainer.max_epochs=2", run_dir=tmp_path / "whole")
    first = train_here(*TINY, *phases, "trainer.max_epochs=1", run_dir=tmp_path / "first")
    last = train_here(*TINY, *phases, "trainer.max_epochs=2", f"resume={first}",
                      run_dir=tmp_path / "last")
    a, b = load_file(whole / "model.safetensors"), load_file(last / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(last / "metrics.json")["val/miou"] == read_json(
        whole / "metrics.json")["val/miou"]
    assert (whole / "val_predictions.csv").read_text() == (last / "val_predictions.csv"
                                                           ).read_text()


def test_digits_segmentation_learns_from_the_digits_classifier(tmp_path: Path) -> None:
    """The recipe as shipped (its source trained first): above the floor, every digit
    found."""
    run = train_here("recipe=digits_segmentation", run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    assert metrics["val/miou"] >= MIOU_FLOOR, metrics
    assert all(v > 0.3 for v in metrics["val/iou_per_class"].values()), metrics
    assert json.loads((run / "load_report.json").read_text())["source"] == "recipe"


def test_a_split_sweep_ranks_the_encoders_freeze_points_by_val_miou(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli("-m", *TINY, "trainer.max_epochs=1",
                     "freeze.train_from=classifier,backbone.layer2,backbone.layer1",
                     "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ranked_leaderboard(tmp_path / "sweep", "val/miou", capsys)
    assert "val_pixel_acc" in rows[0] and len(rows) == 3
    assert {r["train_from"] for r in rows} == {"classifier", "backbone.layer2",
                                                "backbone.layer1"}


def test_two_process_ddp_trains_a_segmentation_model(tmp_path: Path) -> None:
    """Its ranks stay identical; its validation images' scores are gathered in the data's
    order, each as the trained model scores that image alone."""
    run = tmp_path / "run"
    result = run_cli(*TINY, "trainer.max_epochs=1", "trainer.limit_val_batches=null",
                     "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                     "data.canvases.count=28", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    metrics = read_json(run / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["val_images"] == 7  # odd: a padded share
    assert metrics["ddp"] == {"world_size": 2, "frozen_tensors_identical_across_ranks": True,
                              "trained_tensors_identical_across_ranks": True}
    gathered = list(csv.DictReader((run / "val_predictions.csv").read_text().splitlines()))
    [alone] = read_json(run / "evaluation.json").values()
    rows = {w["item"]: w for w in alone["worst"]}
    assert [r["item"] for r in gathered] == [f"#{i}" for i in range(7)]
    for row in gathered:
        if row["item"] in rows:  # the worst images, scored alone after training
            assert float(row["miou"]) == pytest.approx(rows[row["item"]]["miou"], abs=1e-3)


def test_hostile_text_in_a_segmentation_run_dir_is_escaped(frozen_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    """Class names and item names come from received data: the page escapes them, and a
    thumbnail that is not a PNG data URI is dropped."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(frozen_run, run)
    evaluation = read_json(run / "evaluation.json")
    evaluation["val"]["per_class"][1]["class"] = "<script>alert(1)</script>"
    evaluation["val"]["worst"][0]["item"] = "<img src=x onerror=alert(2)>.png"
    evaluation["val"]["worst"][0]["thumbnail"] = "javascript:alert(3)"
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    code, _, err = main_here("report", str(run), capsys=capsys)
    assert code == 0, err
    page = (run / "report.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<img src=x" not in page and "javascript:alert(3)" not in page
