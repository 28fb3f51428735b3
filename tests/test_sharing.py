"""Sharing recipes: list, show, copy, extends, validate; every shipped recipe runs."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from finetune import locations
from tests.conftest import SHRINK, cli_errors, main_here, read_json, run_cli, train_here

DIGITS_1_9 = ["data=digits", "data.classes=[1,2,3,4,5,6,7,8,9]", "data.image_size=32"]
# Shipped recipes that read an image folder run on the digits in tests.
RUN_OVERRIDES = {"resnet50_9cls": DIGITS_1_9, "resnet50_custom_head": DIGITS_1_9,
                 "resnet18_gradual": DIGITS_1_9, "vgg16_relu5_3": ["data.image_size=64"],
                 "convnext_tiny_9cls": DIGITS_1_9, "vit_small_lora_ready": DIGITS_1_9,
                 "vit_small_lora": DIGITS_1_9, "resnet50_dora": DIGITS_1_9}
# After SHRINK: runs long enough to reach every unfreeze phase (one batch an epoch).
ONE_BATCH = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
LONGER = {"resnet18_gradual": ["trainer.max_epochs=5", *ONE_BATCH],
          "vit_small_lora_ready": ["trainer.max_epochs=5", *ONE_BATCH]}
SHRUNK_SOURCE = "weights.recipe_overrides=[" + ",".join(f'"{o}"' for o in SHRINK) + "]"


Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def recipes_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                ) -> Callable[..., subprocess.CompletedProcess]:
    """`python -m finetune.recipes ARGS` run in `cwd` with `env`, in this process (its
    main(argv)): the exit status and output a user sees, without an interpreter start."""

    def call(*args: str, cwd: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        code, out, err = main_here("recipes", *args, capsys=capsys)
        for key in env or {}:
            monkeypatch.delenv(key)
        return subprocess.CompletedProcess(list(args), code, out, err)

    return call


def test_list_shows_every_recipe_and_user_folders(tmp_path: Path, recipes_cli: Cli) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "team_recipe.yaml").write_text("description: our 3-class baseline\n"
                                           "extends: digits_source\nhead:\n  num_classes: 3\n")
    result = recipes_cli("list", "--json", cwd=tmp_path, env={"FINETUNE_RECIPES": str(mine)})
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    shipped = {p.stem for p in locations.RECIPES_DIR.glob("*.yaml")}
    assert shipped | {"team_recipe"} == set(rows)
    assert rows["resnet50_9cls"]["model"] == "resnet50"
    assert rows["resnet50_9cls"]["weights"] == "torchvision:IMAGENET1K_V2"
    assert rows["resnet50_9cls"]["data"] == "imagefolder" and rows["resnet50_9cls"]["classes"] == 9
    assert rows["team_recipe"]["description"] == "our 3-class baseline"
    assert rows["team_recipe"]["classes"] == 3
    assert all(row["description"] for row in rows.values())
    table = recipes_cli("list", cwd=tmp_path)
    assert table.returncode == 0 and "quickstart" in table.stdout


def test_show_resolved_equals_what_the_run_records(tmp_path: Path, recipes_cli: Cli) -> None:
    run = train_here("recipe=digits_source", *SHRINK, run_dir=tmp_path / "run")
    recorded = read_json(run / "manifest.json")["config"]
    shown = recipes_cli("show", "digits_source", "--resolved", *SHRINK, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout) == recorded
    raw = recipes_cli("show", "digits_source", cwd=tmp_path)
    assert raw.stdout == (locations.RECIPES_DIR / "digits_source.yaml").read_text()


def test_copy_gives_a_recipe_that_runs(tmp_path: Path, recipes_cli: Cli) -> None:
    target = tmp_path / "recipes" / "my_digits.yaml"
    result = recipes_cli("copy", "digits_source", str(target), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"python -m finetune recipe={target}" in target.read_text().splitlines()[1]
    again = recipes_cli("copy", "digits_source", str(target), cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr
    (tmp_path / "a_file").write_text("")
    blocked = recipes_cli("copy", "digits_source", str(tmp_path / "a_file" / "r.yaml"),
                          cwd=tmp_path)
    assert blocked.returncode == 2 and blocked.stderr.count("\n") == 1, blocked.stderr
    assert f"cannot create the folder {tmp_path / 'a_file'} (" in blocked.stderr
    run = train_here(f"recipe={target}", *SHRINK, run_dir=tmp_path / "run")
    assert read_json(run / "metrics.json")["status"] == "complete"


def test_three_line_recipe_extending_a_shipped_one(torch_home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    recipes_cli: Cli) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text("extends: resnet50_9cls\noptim:\n  lr: 0.01\n")
    base = recipes_cli("show", "resnet50_9cls", "--resolved", cwd=elsewhere)
    mine = recipes_cli("show", "mine.yaml", "--resolved", cwd=elsewhere)
    base_cfg, mine_cfg = yaml.safe_load(base.stdout), yaml.safe_load(mine.stdout)
    assert mine_cfg["optim"]["lr"] == 0.01
    mine_cfg["optim"]["lr"] = base_cfg["optim"]["lr"]
    assert mine_cfg == base_cfg, "only the overridden key differs"
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    run = train_here("recipe=mine.yaml", *DIGITS_1_9, *SHRINK, run_dir=elsewhere / "run")
    manifest = read_json(run / "manifest.json")
    assert manifest["config"]["optim"]["lr"] == 0.01
    assert manifest["config"]["freeze"]["train_from"] == "layer3"
    assert manifest["recipe"]["file"] == str(elsewhere / "mine.yaml")


def test_cycle_and_missing_base_each_give_one_message(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: resnet50_9clss\n")
    cycle = run_cli("recipe=a.yaml", cwd=tmp_path)
    missing = run_cli("recipe=c.yaml", cwd=tmp_path)
    for result, needle in ((cycle, "extends makes a cycle (a.yaml -> b.yaml -> a.yaml)"),
                           (missing, "extends: resnet50_9clss: recipe=resnet50_9clss: no such "
                                     "recipe (did you mean 'resnet50_9cls'")):
        errors = cli_errors(result)
        assert len(errors) == 1 and needle in errors[0], result.stderr


def test_validate_reports_three_mistakes_at_once(torch_home: Path, tmp_path: Path,
                                                 recipes_cli: Cli) -> None:
    result = recipes_cli("validate", "resnet50_9cls", *DIGITS_1_9, "head.num_classes=4",
                         "freeze.train_from=layer9", "surgery=[{op: remove, path: avgpol}]",
                         cwd=tmp_path, env={"TORCH_HOME": str(torch_home)})
    errors = cli_errors(result, prefix="finetune recipes: error:")
    assert len(errors) == 3, result.stderr
    assert "head.num_classes=4 but the data has 9 classes" in errors[0]
    assert "surgery[0].path='avgpol'" in errors[1]
    assert "freeze.train_from='layer9'" in errors[2]


SHIPPED = sorted(p.stem for p in locations.RECIPES_DIR.glob("*.yaml"))
# Recipes another test already runs end to end, with checks specific to them.
RUN_ELSEWHERE = {
    "quickstart": "test_train_e2e.py::test_quickstart_writes_every_artifact",
    "resnet50_9cls": "test_train_e2e.py::test_resnet50_9cls_through_torchvision_cache",
    "vgg16_relu5_3": "test_recipes.py::test_vgg16_feature_extractor_run",
    "digits_source": "test_sharing.py::test_show_resolved_equals_what_the_run_records",
    # digits_transfer with a search: run as a sweep, shrunk (its real run is in README)
    "digits_transfer_splits": "test_sweeps.py::sweep",
    "digits_detection_splits": "test_detection_training.py::sweep",
    # its COCO data is the user's; run on box_csv canvases, from random weights
    "fasterrcnn_vgg16_relu5_3":
        "test_detection_runs.py::test_the_seeds_vgg16_recipe_is_one_map_under_faster_rcnn",
    # its masks are the user's; run on digit masks from torchvision's file (ours, random)
    "deeplabv3_resnet50_seg":
        "test_recipes.py::test_deeplabv3_recipe_loads_torchvisions_weights_but_the_class_layers",
    # its COCO data is the user's; run on digit canvases from torchvision's file (ours, random)
    "maskrcnn_resnet50_fpn_inst":
        "test_recipes.py::test_maskrcnn_recipe_replaces_both_predictors_and_loads_the_rest",
    # shrunk, and every use of its run dir checked
    "digits_instances": "test_instance_segmentation.py::instance_run",
    # the recipe as shipped, with a floor on what it learns
    "digits_segmentation":
        "test_segmentation.py::test_digits_segmentation_learns_from_the_digits_classifier",
}


def _overrides(name: str) -> list[str]:
    overrides = [*RUN_OVERRIDES.get(name, []), *SHRINK, *LONGER.get(name, [])]
    if "weights:\n  source: recipe" in (locations.RECIPES_DIR / f"{name}.yaml").read_text():
        overrides.append(SHRUNK_SOURCE)
    return overrides


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in (
    "vgg16_relu5_3", "fasterrcnn_vgg16_relu5_3", "deeplabv3_resnet50_seg",
    "maskrcnn_resnet50_fpn_inst")])
def test_every_shipped_recipe_validates(name: str, torch_home: Path, recipes_hub: Path,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(vgg16_relu5_3, fasterrcnn_vgg16_relu5_3, deeplabv3_resnet50_seg and
    maskrcnn_resnet50_fpn_inst are inspected with their weights in test_recipes.py: the 528 MB
    vgg16 file and the DeepLabv3 and Mask R-CNN files are written once, there.)"""
    from finetune.commands.recipes import validate_recipe

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.chdir(tmp_path)
    problems, effects = validate_recipe(name, _overrides(name))
    assert problems == [] and effects[0].startswith("writes its run dir at ")


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in RUN_ELSEWHERE])
def test_every_shipped_recipe_runs(name: str, torch_home: Path, recipes_hub: Path,
                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with caplog.at_level(logging.INFO, logger="finetune"):
        run = train_here(f"recipe={name}", *_overrides(name), run_dir=tmp_path / "run")
    assert read_json(run / "metrics.json")["status"] == "complete"
    for stage in read_json(run / "manifest.json")["freeze"]["stages"][1:]:  # every phase ran
        assert f"unfreeze at epoch {stage['epoch']}: {stage['selector']}" in caplog.text
        assert f"lr-{stage['name']}" in (run / "metrics.csv").read_text()


def test_every_shipped_recipe_is_run_somewhere() -> None:
    tests = Path(__file__).parent
    for name, where in RUN_ELSEWHERE.items():
        file, test = where.split("::")
        assert name in SHIPPED and f"def {test}(" in (tests / file).read_text()


def test_a_user_recipe_folder_makes_names_runnable(tmp_path: Path) -> None:
    folder = tmp_path / "team"
    folder.mkdir()
    (folder / "tiny.yaml").write_text("extends: digits_source\ntrainer:\n  max_epochs: 1\n")
    result = run_cli("recipe=tiny", "--cfg", "job", cwd=tmp_path,
                     env={"FINETUNE_RECIPES": str(folder)})
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["trainer"]["max_epochs"] == 1


def test_validate_reports_a_bad_choice_and_the_model_paths_together(tmp_path: Path) -> None:
    """A bad choice no longer hides the model-level mistakes: three problems, three lines."""
    from finetune.commands.recipes import validate_recipe

    recipe = tmp_path / "three.yaml"
    recipe.write_text("extends: quickstart\nweights:\n  source: none\noptim:\n  name: rmsprob\n"
                      "freeze:\n  train_from: layer9\nsurgery:\n  - {op: remove, path: avgpol}\n")
    problems, effects = validate_recipe(str(recipe), [])
    assert [p.split("'")[0] for p in problems] == [
        f"{recipe}: optim.name=", "surgery[0].path=", "freeze.train_from="]
    assert effects == []
