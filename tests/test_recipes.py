"""The shipped recipes: what they build and load, and `finetune.inspect` on each of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torchvision.ops.misc import FrozenBatchNorm2d

import finetune
from finetune import locations
from finetune.commands.inspect import inspect_plan, render
from finetune.compose.prepare import compose_config
from finetune.training.plan import plan_run
from tests.conftest import (
    main_here,
    problems_here,
    read_json,
    run_cli,
    train_here,
)

DIGITS_1_9 = ["data=digits", "data.classes=[1,2,3,4,5,6,7,8,9]", "data.image_size=64"]
# Recipes that read an image folder inspect on the digits instead.
RECIPE_OVERRIDES = {"resnet50_9cls": DIGITS_1_9, "resnet50_custom_head": DIGITS_1_9,
                    "resnet18_gradual": DIGITS_1_9, "convnext_tiny_9cls": DIGITS_1_9,
                    "vit_small_lora_ready": DIGITS_1_9, "vit_small_lora": DIGITS_1_9,
                    "resnet50_dora": DIGITS_1_9,
                    "fasterrcnn_vgg16_relu5_3": ["data=digit_canvases", "data.image_size=64",
                                                 "data.canvases.count=8",
                                                 "data.canvases.size=64"],
                    "deeplabv3_resnet50_seg": ["data=digit_masks", "data.image_size=64",
                                               "data.canvases.count=8"],
                    "maskrcnn_resnet50_fpn_inst": ["data=digit_canvases", "data.image_size=64",
                                                   "data.canvases.count=8",
                                                   "data.canvases.size=64"]}


@pytest.fixture
def offline_home(torch_home_vgg: Path, recipes_hub: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> Path:
    """torch's and the Hugging Face cache with every shipped recipe's weights (random)."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home_vgg))
    return torch_home_vgg


@pytest.mark.parametrize("name", sorted(locations.shipped_recipes()))
def test_inspect_runs_on_every_shipped_recipe(name: str, offline_home: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = inspect_plan(*compose_config([f"recipe={name}", *RECIPE_OVERRIDES.get(name, [])]),
                        splits=True)
    text = render(plan)
    assert plan["recipe"]["name"] == name
    assert plan["modules"][0]["path"] == "(model)"
    # boxes: any count
    assert plan["output_shape"] or plan["config"]["task"] in ("detection",
                                                              "instance_segmentation")
    assert "== optimizer ==" in text and "weights:" in text
    assert f"== feature cache == {plan['feature_cache']}" in text
    if plan["config"]["weights"]["source"] == "recipe":
        assert "no run of it with this config yet" in plan["notes"][0]
        assert not (tmp_path / "outputs").exists(), "inspect must not train the source"


def test_gradual_recipe_opens_the_network_in_phases(offline_home: Path) -> None:
    plan = inspect_plan(*compose_config(["recipe=resnet18_gradual", *DIGITS_1_9]))
    phases = plan["freeze"]["phases"]
    assert [(p["epoch"], p["name"]) for p in phases] == [(0, "fc"), (2, "layer4"), (4, "early")]
    assert phases[-1]["share"] == 1.0 and phases[0]["share"] < 0.01
    assert plan["feature_cache"] == "off: freeze.unfreeze changes the frozen part during the run"
    lr = {g["name"]: g["lr"] for g in plan["optimizer"]["groups"]}
    assert lr["fc"] > lr["layer4"] > lr["early"]  # earlier layers learn slower
    assert lr["early"] == pytest.approx(1e-4) and lr["early/no_decay"] == pytest.approx(1e-4)
    text = render(plan)
    assert "epoch   2: train_from: layer4" in text
    rows = {r["path"]: r["state"] for r in plan["modules"]}
    assert rows["layer4"] == "frozen (unfreezes at epoch 2)"
    assert rows["layer1"] == "frozen (unfreezes at epoch 4)"


def model_has_no_bias(module: torch.nn.Module) -> bool:
    return module.bias is None


def test_custom_head_loads_exactly_what_name_filtering_would(offline_home: Path) -> None:
    cfg, _ = compose_config(["recipe=resnet50_custom_head", *DIGITS_1_9])
    plan = plan_run(cfg)
    assert plan.problems == [] and plan.class_names == [str(d) for d in range(1, 10)]
    built = plan.built
    checkpoint_file = offline_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    fresh = built.model.state_dict()
    by_name = {k for k, v in checkpoint.items() if k in fresh and fresh[k].shape == v.shape}
    assert set(built.report.loaded) == by_name
    assert len(by_name) == 318
    assert set(built.report.new) == {"avgpool.0.1.weight", "fclass.weight", "fclass.bias"}
    assert model_has_no_bias(built.model.avgpool[0][1])  # the seed's ConvTranspose2d
    assert built.head_paths == ["fclass"]
    model = built.model.eval()
    assert isinstance(model.avgpool[0][1], torch.nn.ConvTranspose2d)
    assert isinstance(model.avgpool[1], torch.nn.MaxPool2d)
    with torch.inference_mode():
        assert model(torch.zeros(3, 3, 64, 64)).shape == (3, 9)
    for key in by_name:
        assert torch.equal(model.state_dict()[key], checkpoint[key]), key


def test_inspect_cli_json_and_validation_errors(torch_home: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The true CLI once (--json), then the same command's error in this process."""
    env = {"TORCH_HOME": str(torch_home)}
    result = run_cli("recipe=resnet50_9cls", *DIGITS_1_9, "--json", "--keys", "--splits",
                     cwd=tmp_path, env=env, module="finetune.inspect")
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["freeze"]["train_from"] == "layer3"
    assert plan["load_report"]["counts"]["loaded"] == 318
    assert {"key": "fc.weight", "shape": [9, 2048], "fate": "new"} in plan["keys"]
    assert [s["train_from"] for s in plan["splits"]][6] == "layer3"
    assert plan["optimizer"]["groups"][0]["first"] == "layer3.0.conv1.weight"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    code, _, err = main_here("inspect", "recipe=resnet50_9cls", *DIGITS_1_9,
                             "freeze.train_from=layer5", capsys=capsys)
    assert code == 2 and "freeze.train_from='layer5' matches no module" in err
    assert "did you mean" in err and "'layer4'" in err


def test_vgg16_feature_extractor_run(torch_home_vgg: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.commands.recipes import validate_recipe

    monkeypatch.setenv("TORCH_HOME", str(torch_home_vgg))
    monkeypatch.chdir(tmp_path)
    problems, effects = validate_recipe("vgg16_relu5_3", [])
    assert problems == [] and effects[0].startswith("writes its run dir at ")
    run = train_here("recipe=vgg16_relu5_3", run_dir=tmp_path / "run")
    manifest = read_json(run / "manifest.json")
    assert manifest["output_shape"] == [512, 14, 14]
    assert manifest["head"]["type"] == "none" and manifest["class_names"] is None
    report = read_json(run / "load_report.json")
    assert report["counts"]["loaded"] == 26 and report["missing"] == []
    assert all(k.startswith("classifier.") for k in report["unexpected"])
    assert read_json(run / "metrics.json")["status"] == "complete"
    from safetensors.torch import load_file

    saved = load_file(str(run / "model.safetensors"))
    reference = torchvision.models.vgg16().features[:-1].state_dict()
    assert sorted(saved) == sorted(f"features.{k}" for k in reference)


def test_path_mistakes_are_reported_together(torch_home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    errors = problems_here("recipe=resnet50_custom_head", *DIGITS_1_9,
                           "freeze.train_from=layer7", "weights.require=[head.*]",
                           "surgery=[{op: remove, path: avgpol}, {op: replace, path: fc, with: "
                           "{type: Lineer}}]", run_dir=tmp_path / "run")
    assert len(errors) == 4, errors
    assert "surgery[0].path='avgpol'" in errors[0] and "'avgpool'" in errors[0]
    assert "unknown layer type 'Lineer'" in errors[1]
    assert "freeze.train_from='layer7'" in errors[2]
    assert "weights.require: 'head.*' matches no model tensor" in errors[3]


@pytest.mark.parametrize("override", [
    "data.augment=[{Resize: {size: -4}}]", "surgery=[{op: rename, path: fc, to: training}]",
    "data.batch_size=1", "head.dropout=-0.5", "optim.groups=[{modules: fc, lr: -0.1}]"])
def test_validate_refuses_what_used_to_crash_later(override: str) -> None:
    """`recipes validate` said ok to these, and the run then crashed or trained uphill: it
    is the plan, so it says what the run would say."""
    from finetune.commands.recipes import validate_recipe

    problems, _ = validate_recipe("quickstart", ["weights.source=none", override])
    assert len(problems) == 1 and problems[0].startswith(override.partition("=")[0].split(
        ".")[0]), problems


def test_deeplabv3_recipe_loads_torchvisions_weights_but_the_class_layers(
        offline_home: Path, tmp_path: Path) -> None:
    """deeplabv3_resnet50_seg on 11 classes: every tensor of torchvision's file (ours, random)
    loads but the 21-class layers of the classifier and its auxiliary twin, which are new;
    the stem stays frozen; it trains (its auxiliary head too) and writes its run dir."""
    cfg, _ = compose_config(["recipe=deeplabv3_resnet50_seg",
                             *RECIPE_OVERRIDES["deeplabv3_resnet50_seg"]])
    plan = plan_run(cfg)
    assert plan.problems == [] and plan.built.head_paths == ["classifier.4", "aux_classifier.4"]
    report = plan.built.report
    assert sorted(s["key"] for s in report.shape_skipped) == [
        "aux_classifier.4.bias", "aux_classifier.4.weight", "classifier.4.bias",
        "classifier.4.weight"]
    assert report.missing == [] and report.unexpected == []
    frozen = [n for n, p in plan.built.model.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.conv1.weight", "backbone.bn1.weight", "backbone.bn1.bias"]
    run = train_here("recipe=deeplabv3_resnet50_seg", *RECIPE_OVERRIDES["deeplabv3_resnet50_seg"],
                     "data.batch_size=2", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                     "trainer.limit_val_batches=1", run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and 0 <= metrics["val/miou"] <= 1
    trained = load_file(run / "model.safetensors")
    assert trained["aux_classifier.4.weight"].shape[0] == 11  # the background and ten digits
    loaded = torch.load(offline_home / "hub" / "checkpoints" / Path(
        torchvision.models.get_model_weights("deeplabv3_resnet50")["COCO_WITH_VOC_LABELS_V1"].url
    ).name, weights_only=True)
    assert torch.equal(trained["backbone.conv1.weight"], loaded["backbone.conv1.weight"])


def test_maskrcnn_recipe_replaces_both_predictors_and_loads_the_rest(
        offline_home: Path, tmp_path: Path) -> None:
    """maskrcnn_resnet50_fpn_inst on the ten digits: every tensor of torchvision's COCO file
    (ours, random) loads but the 91-class box and mask predictors, which are new and sized
    for ten classes and the background; the stem and layer1 stay frozen; one step trains and
    the run measures mask mAP."""
    overrides = RECIPE_OVERRIDES["maskrcnn_resnet50_fpn_inst"]
    cfg, _ = compose_config(["recipe=maskrcnn_resnet50_fpn_inst", *overrides])
    plan = plan_run(cfg)
    assert plan.problems == [] and plan.built.head_paths == [
        "roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits"]
    report = plan.built.report
    assert sorted(s["key"] for s in report.shape_skipped) == [
        "roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert report.missing == [] and report.unexpected == []
    trainable = {n.split(".")[2] for n, p in plan.built.model.named_parameters()
                 if p.requires_grad and n.startswith("backbone.body.")}
    assert trainable == {"layer2", "layer3", "layer4"}
    # its backbone's BatchNorm frozen as torchvision builds it for these weights: none
    # trains, each holds the file's statistics
    norms = {n: m for n, m in plan.built.model.named_modules()
             if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))}
    assert len(norms) == 53 and all(isinstance(m, FrozenBatchNorm2d) for m in norms.values())
    published = torch.load(next((offline_home / "hub" / "checkpoints").glob("maskrcnn*")),
                           weights_only=True)
    assert all(torch.equal(m.running_var, published[f"{n}.running_var"])
               for n, m in norms.items())
    assert any("53 BatchNorm layers of maskrcnn_resnet50_fpn's backbone are "
               "FrozenBatchNorm2d" in n for n in plan.notes)
    run = train_here("recipe=maskrcnn_resnet50_fpn_inst", *overrides, "data.batch_size=2",
                     "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                     "trainer.limit_val_batches=1", run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and 0 <= metrics["val/mask_map"] <= 1
    trained = load_file(run / "model.safetensors")
    assert trained["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 11
    assert all(torch.equal(trained[f"{n}.running_mean"], published[f"{n}.running_mean"])
               for n in norms)  # trained a step, the statistics are the file's still
    loaded = finetune.load(run, device="cpu")
    assert isinstance(loaded.backbone.body.layer3[0].bn1, FrozenBatchNorm2d)
