"""An extension without a fork: a package installed beside finetune registers a data format,
a task and a learning-rate schedule through entry points, and the real CLI runs a recipe that
names them — in a sweep's worker processes too (and in DDP ranks: tests/test_ddp.py).
`inspect --plugins` lists them; a broken or clashing plugin is one sentence, not a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.compose.prepare import prepare
from finetune.errors import ConfigError, FinetuneError
from finetune.extensions import TABLES, load_plugins
from tests.conftest import SHRINK, cli_errors, read_json, run_cli
from tests.stripes_plugin import RECIPE, install


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("plugin")
    (root / "stripes.yaml").write_text(RECIPE)
    return root, install(root / "site")


def test_a_sweeps_worker_processes_find_the_plugin(plugin: tuple[Path, dict[str, str]]
                                                   ) -> None:
    """A recipe names the plugin's data format, task and schedule; joblib's workers import
    finetune afresh and unpickle the task: the plugin's entries are there too. (DDP ranks
    find it as well: tests/test_ddp.py runs this recipe on two ranks.)"""
    root, env = plugin
    result = run_cli("-m", "recipe=stripes.yaml", *SHRINK, "seed=0,1",
                     "hydra/launcher=parallel", "hydra.sweep.dir=sweep", cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        metrics = read_json(root / "sweep" / job / "metrics.json")
        assert metrics["status"] == "complete"
        assert metrics["task"] == "binary"  # the plugin's task, recorded by name
        manifest = read_json(root / "sweep" / job / "manifest.json")
        assert manifest["class_names"] == ["vertical", "horizontal"]
        assert manifest["task"] == "binary"
        assert (manifest["config"]["data"]["name"], manifest["config"]["sched"]["name"]) == (
            "stripes", "linear")


def test_without_the_plugin_the_names_are_not_choices(plugin: tuple[Path, dict[str, str]]
                                                      ) -> None:
    """This test process has not installed it: the recipe's names are refused, each in one
    line, as for any name that is not in a table."""
    root, _ = plugin
    with pytest.raises(ConfigError) as refused:
        prepare([f"recipe={root / 'stripes.yaml'}"])
    errors = refused.value.problems
    assert any("data.name='stripes' is not one of" in e for e in errors), errors
    assert any("task='binary' is not one of" in e for e in errors), errors
    assert any("sched.name='linear' is not one of" in e for e in errors), errors


def test_inspect_lists_the_plugins(plugin: tuple[Path, dict[str, str]]) -> None:
    root, env = plugin
    result = run_cli("inspect", "--plugins", "--json", cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    tables = {t["key"]: t for t in json.loads(result.stdout)}
    assert set(tables) == {"weights.source", "model.source", "data.name", "sched.name",
                           "freeze.bn", "logger.name", "task"}
    plugins = {(key, e["name"], e["plugin"]) for key, t in tables.items()
               for e in t["entries"] if e["plugin"]}
    assert plugins == {("data.name", "stripes", "finetune_stripes:Stripes"),
                       ("task", "binary", "finetune_stripes:Binary"),
                       ("sched.name", "linear", "finetune_stripes:Linear")}
    assert tables["data.name"]["group"] == "finetune.data_formats"


@pytest.mark.parametrize(("entry_points", "expected"), [
    ("[finetune.data_formats]\nstripes = finetune_nowhere:Stripes\n",
     "plugin stripes (finetune_nowhere:Stripes, entry point group finetune.data_formats) "
     "cannot be imported: ModuleNotFoundError: No module named 'finetune_nowhere'; fix or "
     "uninstall its package"),
    ("[finetune.data_formats]\ncsv = finetune_broken:Stripes\n",
     "plugin finetune_broken:Stripes (entry point group finetune.data_formats) names "
     "data.name=csv, which finetune already has; rename the entry point"),
    ("[finetune.schedules]\ncosine2 = finetune_broken:Linear\n",
     "plugin finetune_broken:Linear: its name is 'linear' but its entry point is 'cosine2'; "
     "make them the same"),
], ids=["cannot-import", "clashes", "misnamed"])
def test_a_broken_plugin_is_one_sentence(tmp_path: Path, entry_points: str, expected: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Found the way every process finds plugins (the entry points on sys.path); nothing is
    added to a table, and the CLI says it once and stops."""
    install(tmp_path / "site", entry_points, name="finetune_broken")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    before = {key: dict(table) for key, table in TABLES.items()}
    try:
        problems = load_plugins()
    except FinetuneError as err:
        problems = err.problems
    assert problems == [expected]
    assert {key: dict(table) for key, table in TABLES.items()} == before
    if "cannot-import" not in expected:  # and through the real CLI, once
        errors = cli_errors(run_cli("recipe=quickstart", "weights.source=none",
                                    cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join(
                                        p for p in (str(tmp_path / "site"),
                                                    os.environ.get("PYTHONPATH")) if p)}))
        assert errors == [f"finetune: error: {expected}"]


def test_a_plugin_planted_in_the_working_directory_is_never_imported(tmp_path: Path) -> None:
    """`python -m finetune` puts the working directory first on sys.path: a received folder
    that holds a `*.dist-info` naming a module of its own must not get that module imported
    (it would run its code) nor its entry listed — a plugin is what the user installed."""
    planted = tmp_path / "received"
    planted.mkdir()
    (planted / "finetune_planted.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('IMPORTED').write_text('ran')\n"
        "from finetune.data.formats import DataFormat\n\n\n"
        "class Planted(DataFormat):\n    name = 'planted'\n")
    info = planted / "finetune_planted-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: finetune_planted\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[finetune.data_formats]\nplanted = finetune_planted:Planted\n")
    result = run_cli("inspect", "--plugins", "--json", cwd=planted)
    assert result.returncode == 0, result.stderr
    listed = {e["name"] for t in json.loads(result.stdout) for e in t["entries"]}
    assert "planted" not in listed and {"csv", "multiclass"} <= listed
    assert not (planted / "IMPORTED").exists(), "the planted module ran"
