"""A received data folder or CSV list is untrusted: it shows only its own files, and every
CSV finetune writes is safe to open in a spreadsheet.

A folder whose files are links to pictures elsewhere on the machine (or a CSV naming `../` or
absolute paths) would put those pictures into report.html, the page meant for colleagues, and
name them in the CSVs; a label such as `=HYPERLINK(...)` would run in the spreadsheet that
opens a predictions file."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.compose.prepare import compose_config
from finetune.data.datamodule import ImageFiles
from finetune.data.formats import FORMATS
from finetune.errors import FinetuneError
from finetune.rundir import evaluation
from tests.conftest import main_here, read_json, train_here, write_digit_images


def _read(*overrides: str, task: str = "read") -> tuple:
    cfg, _ = compose_config(["weights.source=none", *overrides])
    data_format = FORMATS[cfg.data.name]
    if task == "label_sets":
        return data_format.read_label_sets(cfg.data)
    return data_format.read(cfg.data, 32, 0)


@pytest.fixture
def private(tmp_path: Path) -> Path:
    """A picture elsewhere on the machine (not in any data folder)."""
    return write_digit_images(tmp_path / "private", [9], 3)[9][0]


def _outside_cases(tmp_path: Path, private: Path) -> dict[str, list[str]]:
    """name -> the overrides that read a data folder or CSV reaching outside itself."""
    cases: dict[str, list[str]] = {}
    linked = tmp_path / "linked"  # a class folder's file is a link out
    write_digit_images(linked, [0, 1], 4)
    (linked / "1" / "secret.png").symlink_to(private)
    cases["file link"] = ["data=imagefolder", f"data.root={linked}"]
    folder_link = tmp_path / "folder_link"  # a whole class folder is a link out
    write_digit_images(folder_link, [0], 4)
    (folder_link / "9").symlink_to(private.parent, target_is_directory=True)
    cases["class folder link"] = ["data=imagefolder", f"data.root={folder_link}"]
    split = tmp_path / "split"  # the val/ split's file is a link out
    write_digit_images(split / "train", [0, 1], 4)
    write_digit_images(split / "val", [0, 1], 2, start=4)
    (split / "val" / "0" / "secret.png").symlink_to(private)
    cases["val link"] = ["data=imagefolder", f"data.root={split}"]
    listed = tmp_path / "lists"
    images = write_digit_images(listed / "img", [3, 4], 4)
    rows = [f"{p.relative_to(listed)},{d}" for d, paths in images.items() for p in paths]
    for name, path in (("dotdot", f"../private/9/{private.name}"), ("absolute", str(private))):
        (listed / f"{name}.csv").write_text("\n".join([*rows, f"{path},4"]) + "\n")
        cases[f"csv {name}"] = ["data=csv", f"data.root={listed / f'{name}.csv'}"]
    (listed / "img" / "4" / "secret.png").symlink_to(private)
    (listed / "link.csv").write_text("\n".join([*rows, "img/4/secret.png,4"]) + "\n")
    cases["csv link"] = ["data=csv", f"data.root={listed / 'link.csv'}"]
    (listed / "test_split.csv").write_text(
        "\n".join([*rows, f"../private/9/{private.name},3,test"]) + "\n")
    cases["csv test row"] = ["data=csv", f"data.root={listed / 'test_split.csv'}"]
    (listed / "sets.csv").write_text("\n".join(
        [f"{p.relative_to(listed)},a;b" for p in images[3]]
        + [f"{p.relative_to(listed)},b" for p in images[4]] + [f"{private},a"]) + "\n")
    cases["multilabel csv"] = ["task=multilabel", "data=csv", f"data.root={listed / 'sets.csv'}"]
    return cases


def test_a_data_folder_or_csv_uses_only_its_own_files(tmp_path: Path, private: Path) -> None:
    for name, overrides in _outside_cases(tmp_path, private).items():
        task = "label_sets" if "task=multilabel" in overrides else "read"
        with pytest.raises(FinetuneError) as refused:
            _read(*[o for o in overrides if not o.startswith("task=")], task=task)
        message = refused.value.problems[0]
        assert "outside" in message and "data.follow_links=true" in message, (name, message)
        assert str(private.parent.resolve()) in message, (name, message)  # where it points
        # the person at the command line may opt in
        _read(*[o for o in overrides if not o.startswith("task=")], "data.follow_links=true",
              task=task)
    # a link that stays inside the data is fine
    inside = tmp_path / "inside"
    images = write_digit_images(inside, [0, 1], 4)
    (inside / "1" / "again.png").symlink_to(images[0][0])
    full = _read("data=imagefolder", f"data.root={inside}")[0]
    assert len(full.items) == 9


def test_a_recipe_cannot_opt_in_to_files_outside_its_data(tmp_path: Path) -> None:
    from finetune.commands.recipes import validate_recipe
    from finetune.compose.prepare import prepare

    recipe = tmp_path / "follow.yaml"
    recipe.write_text("data:\n  follow_links: true\n")
    with pytest.raises(FinetuneError, match=r"data\.follow_links cannot be set in a received"):
        prepare([f"recipe={recipe}"])
    assert any("data.follow_links cannot be set" in p for p in validate_recipe(str(recipe), [])[0])
    recipe.write_text("data:\n  follow_links: false\n")  # what every recorded config holds
    prepare([f"recipe={recipe}"])


def test_the_report_shows_thumbnails_of_the_datas_own_files_only(tmp_path: Path,
                                                                 private: Path) -> None:
    """Even with data.follow_links=true a file outside the data root is never on the page."""
    root = tmp_path / "data"
    inside = write_digit_images(root, [0], 1)[0][0]
    (root / "0" / "link.png").symlink_to(private)
    dataset = ImageFiles([inside, root / "0" / "link.png"], [0, 0], transform=None, root=root)
    assert evaluation.thumbnail(dataset, 0).startswith("data:image/png;base64,")
    assert evaluation.thumbnail(dataset, 1) is None
    no_root = ImageFiles([inside], [0], transform=None)
    assert evaluation.thumbnail(no_root, 0) is None


FORMULA_CLASSES = ["=HYPERLINK(1)", "+cats", "-dogs", "@sum"]


def _spreadsheet_safe(path: Path) -> list[str]:
    """Every cell of a CSV a spreadsheet would run as a formula (a number is not one); the
    cells that carry a neutralised formula come back for the caller to see them there."""
    rows = list(csv.reader(path.open(newline="")))
    assert rows, path
    neutralised = []
    for row in rows:
        for cell in row:
            if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                float(cell)  # only a number may start so
            if cell.startswith(("'=", "'+", "'-", "'@")):
                neutralised.append(cell)
    return neutralised


@pytest.fixture(scope="module")
def formula_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run on a folder whose class names are spreadsheet formulas, with val and test
    splits; (the run dir, the data folder)."""
    data = tmp_path_factory.mktemp("formulas")
    for part, start, count in (("train", 0, 8), ("val", 8, 3), ("test", 11, 3)):
        written = write_digit_images(data / part, [0, 1, 2, 3], count, start=start)
        for digit, name in zip(written, FORMULA_CLASSES, strict=True):
            (data / part / str(digit)).rename(data / part / name)
    run = train_here("data=imagefolder", f"data.root={data}", "weights.source=none",
                     "model.name=resnet18", "data.image_size=32", "trainer.max_epochs=1",
                     "trainer.enable_progress_bar=false", "data.batch_size=16",
                     "data.decode_cache=false",
                     run_dir=tmp_path_factory.mktemp("formula_run") / "run")
    return run, data


def test_every_csv_finetune_writes_is_safe_to_open(formula_run: tuple[Path, Path],
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run, data = formula_run
    for name in ("val_predictions.csv", "test_predictions.csv"):
        assert set(_spreadsheet_safe(run / name)) >= {f"'{c}" for c in FORMULA_CLASSES[:2]}
    code, _, err = main_here("evaluate", f"run={run}", "data=imagefolder",
                             f"data.root={data}", "split=test", f"output={tmp_path / 'eval'}",
                             capsys=capsys)
    assert code == 0, err
    assert _spreadsheet_safe(tmp_path / "eval" / "eval_predictions.csv")
    code, _, err = main_here("predict", f"run={run}", f"input={data / 'test'}",
                             f"output={tmp_path / 'predictions.csv'}", capsys=capsys)
    assert code == 0, err
    assert _spreadsheet_safe(tmp_path / "predictions.csv")
    # a received sweep dir: its job dirs' names and recorded overrides become leaderboard cells
    sweep = tmp_path / "sweep"
    for job, value in (("=HYPERLINK(0)", "=cmd|' /C calc'!A0"), ("@0", "-1+cmd|' /C calc'!A0")):
        shutil.copytree(run, sweep / job, symlinks=True)
        (sweep / job / ".hydra").mkdir(exist_ok=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"freeze.train_from={value}", "optim.lr=0.01"]))
    assert main_here("report", str(sweep), capsys=capsys)[0] == 0
    assert _spreadsheet_safe(sweep / "leaderboard.csv")
    # the report shows the confidently wrong images of the data's own files
    wrong = read_json(run / "evaluation.json")["val"]["confidently_wrong"]
    assert wrong and all(w["thumbnail"].startswith("data:image/png") for w in wrong)


def test_bad_images_csv_is_safe_to_open(tmp_path: Path) -> None:
    from finetune.rundir import artifacts

    path = tmp_path / "bad_images.csv"
    artifacts.write_csv(path, ["path", "reason"], [["=1+1.png", "-not an image"],
                                                   ["a.png", "+x"], ["-0.5", -3]])
    rows = list(csv.reader(path.open(newline="")))
    assert rows[1:] == [["'=1+1.png", "'-not an image"], ["a.png", "'+x"], ["-0.5", "-3"]]
