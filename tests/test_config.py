"""Compose-time behaviour: the typed schema, recipes by name or path, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from finetune import locations
from finetune.compose import gate, safe_files, schema
from finetune.compose.prepare import prepare
from tests.conftest import cli_errors, main_here, run_cli


def compose_cfg(*overrides: str, cwd: Path | None = None):
    args = prepare(list(overrides), cwd)
    with initialize_config_dir(str(locations.CONF_DIR), version_base="1.3"):
        return compose("config", overrides=args)


@pytest.mark.parametrize("name", sorted(locations.shipped_recipes()))
def test_every_shipped_recipe_composes_cleanly(name: str) -> None:
    path = locations.shipped_recipes()[name]
    assert gate.recipe_problems(safe_files.load_yaml(path), str(path)) == []
    assert path.read_text().startswith("#"), "a recipe opens with a comment giving its command"
    assert f"recipe={name}" in path.read_text().split("@package")[0]
    compose_cfg(f"recipe={name}")


def test_recipe_values_and_group_override_apply() -> None:
    cfg = compose_cfg("recipe=resnet50_9cls", "optim.lr=0.5")
    assert cfg.model.name == "resnet50"
    assert cfg.data.name == "imagefolder"  # the recipe's `override /data: imagefolder`
    assert cfg.freeze.train_from == "layer3"
    assert cfg.optim.lr == 0.5  # the command line beats the recipe


def test_recipe_from_a_path_anywhere(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text(
        "# mine\n# @package _global_\nmodel:\n  name: mobilenet_v3_small\nhead:\n  dropout: 0.3\n")
    result = run_cli("--cfg", "job", "recipe=sub/mine.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    assert job["model"]["name"] == "mobilenet_v3_small"
    assert job["head"]["dropout"] == 0.3


def _assert_one_line_errors(result: subprocess.CompletedProcess, *needles: str) -> None:
    errors = cli_errors(result)
    for needle in needles:
        assert any(needle in line for line in errors), (needle, result.stderr)


def test_unknown_key_fails_at_compose_with_nearest_match(tmp_path: Path) -> None:
    result = run_cli("recipe=quickstart", "optim.lrr=0.1", cwd=tmp_path)
    _assert_one_line_errors(result, "unknown key 'optim.lrr'", "did you mean 'lr'",
                            "valid keys in 'optim': name, lr")
    assert not (tmp_path / "outputs").exists(), "nothing may run before the config is valid"


def test_wrong_type_and_bad_choice_are_reported_together(tmp_path: Path) -> None:
    result = run_cli("recipe=quickstart", "trainer.max_epochs=many", "optim.name=adamm",
                     "data=digitz", "lr=1", cwd=tmp_path)
    _assert_one_line_errors(result, "trainer.max_epochs='many' has the wrong type",
                            "optim.name='adamm' is not one of", "did you mean 'adam'",
                            "no data option 'digitz'", "unknown key 'lr'")
    assert len(result.stderr.strip().splitlines()) == 4


def test_mistakes_inside_a_recipe_file_are_all_reported(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("# @package _global_\noptim:\n  lrr: 0.1\ndata:\n  batch_size: lots\n"
                      "modle:\n  name: resnet18\n")
    result = run_cli(f"recipe={recipe}", cwd=tmp_path)
    _assert_one_line_errors(result, "unknown key 'optim.lrr'", "data.batch_size='lots'",
                            "unknown key 'modle'", "did you mean 'model'")


def test_unknown_recipe_names_the_closest(tmp_path: Path) -> None:
    result = run_cli("recipe=quickstrat", cwd=tmp_path)
    _assert_one_line_errors(result, "no such recipe", "did you mean 'quickstart'")
    result = run_cli("recipe=nowhere/x.yaml", cwd=tmp_path)
    _assert_one_line_errors(result, "no such file")


COMMANDS = ["train", "inspect", "recipes", "report", "predict", "export", "evaluate"]
# `python -m finetune.X` kept for scripts written before `finetune X`
SHIMS = ["finetune.inspect", "finetune.recipes", "finetune.report", "finetune.export",
         "finetune.evaluate"]


def test_help_and_reading_commands_do_not_import_torch(tmp_path: Path) -> None:
    """--help of every command exits 0 with its usage, examples and the other commands;
    --cfg job, recipes list/show and report read files: none of them imports torch. One
    interpreter runs them all, checking sys.modules after each."""
    sweep = tmp_path / "sweep" / "0"
    sweep.mkdir(parents=True)
    (sweep / "metrics.json").write_text('{"status": "complete", "val/acc": 0.5}')
    calls = [["finetune", c, "--help"] for c in COMMANDS] + [[m, "--help"] for m in SHIMS] + [
        ["finetune", "--cfg", "job", "recipe=resnet50_9cls"],
        ["finetune", "recipes", "list"],
        ["finetune", "recipes", "show", "quickstart", "--resolved"],
        ["finetune.report", str(tmp_path / "sweep")],
        # refused before torch is imported, and nothing left behind
        ["finetune", "recipe=quickstart", "data=imagefolder", "data.root=nowhere"],
        ["finetune", "recipe=quickstart", "head.num_classes=3"],
        ["finetune", "weights.source=local_dir", "weights.path=nowhere"],
        ["finetune", "weights.source=hf_hub", "weights.repo=../up"],
        ["finetune", "recipe=digits_detection", "data=digits"],
        # a sweep whose settings are wrong stops before a job starts, without torch
        ["finetune", "-m", "recipe=quickstart", "sweep=optuna", "metric=val/loss",
         "hydra.sweep.dir=search"]]
    code = (f"import json, runpy, sys\nresults = []\nfor call in {calls!r}:\n"
            "    sys.argv = [call[0], *call[1:]]\n"
            "    try:\n        runpy.run_module(call[0], run_name='__main__')\n        rc = 0\n"
            "    except SystemExit as done:\n        rc = done.code or 0\n"
            "    results.append([call, rc, 'torch' in sys.modules,\n"
            "                    'matplotlib' in sys.modules or 'PIL' in sys.modules])\n"
            "print('RESULTS', json.dumps(results))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULTS"))
    for call, rc, torch_loaded, slow_loaded in json.loads(line.split(" ", 1)[1]):
        if "--help" in call:  # the helps come first: nothing slow was imported before them
            assert not slow_loaded, (call, "--help imported matplotlib or Pillow")
        expected = 2 if any(a in call for a in ("data.root=nowhere", "head.num_classes=3",
                                                "weights.path=nowhere", "weights.repo=../up",
                                                "metric=val/loss", "data=digits")) else 0
        assert rc == expected and not torch_loaded, (call, rc, torch_loaded,
                                                     result.stderr[-2000:])
    assert "finetune: error: data.root='nowhere': no such path" in result.stderr
    assert "finetune: error: head.num_classes=3 but the data has 5 classes" in result.stderr
    assert "finetune: error: weights.path='nowhere': no such folder" in result.stderr
    assert "finetune: error: weights.repo='../up' is not a Hugging Face repo id" in result.stderr
    assert "finetune: error: hydra.sweeper.direction=maximize but the jobs return " \
        "metric=val/loss" in result.stderr
    assert "finetune: error: task=detection reads boxes, and data=digits holds class " \
        "labels" in result.stderr
    assert not (tmp_path / "outputs").exists(), "a refused run leaves no run dir"
    for command in COMMANDS:
        assert f"finetune {command}: " in result.stdout
    assert result.stdout.count("usage: finetune ") == len(COMMANDS) + len(SHIMS)
    listing = result.stdout.split("other commands:", 1)[1]
    assert all(f"finetune {c} " in listing for c in COMMANDS[1:])
    assert "rerun=RUN_DIR" in result.stdout and "hydra/launcher: " in result.stdout
    assert "--allow-module PREFIX" in result.stdout


def test_an_unknown_command_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    """A first word that is neither a command nor key=value: the closest command, the list,
    exit 2; key=value and flags still go to train."""
    code, out, err = main_here("predcit", "run=x", capsys=capsys)
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        "finetune: error: unknown command 'predcit' (did you mean 'predict'?); the commands are "
        "train, predict, evaluate, export, report, inspect, recipes (train is the default: "
        "finetune recipe=NAME)"]


def test_help_lists_the_recipes(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "recipe: " in result.stdout and "quickstart" in result.stdout


# Every key of the schema has a default and a one-line comment in conf/.
_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>\w+):(?P<value>[^#]*?)\s*(#\s*(?P<comment>.+))?$")


def _documented(path: Path) -> dict[str, tuple[str, str | None]]:
    """dotted key -> (value text, comment) for every key line of a conf YAML."""
    out: dict[str, tuple[str, str | None]] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        out[key] = (match["value"].strip(), match["comment"])
        stack.append((indent, match["key"]))
    return out


def _schema_leaves(node: object, prefix: str = "") -> dict[str, object]:
    out = {}
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            out.update(_schema_leaves(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def test_conf_documents_every_schema_key_with_its_default() -> None:
    leaves = _schema_leaves(schema.Config())
    main = _documented(locations.CONF_DIR / "config.yaml")
    # data and logger are groups whose options hold their keys; sweep's options are
    # @package _global_ searches, and its keys (sweep.*) are in conf/config.yaml
    option_groups = [g for g in schema.GROUPS if g != "sweep"]
    for key, default in leaves.items():
        group = key.split(".")[0]
        if group in option_groups:
            continue
        assert key in main, f"{key} is not in conf/config.yaml"
        value, comment = main[key]
        assert comment, f"{key} has no comment in conf/config.yaml"
        assert yaml.safe_load(value) == default, f"{key}: conf says {value}, schema {default}"
    for group in option_groups:
        for option in sorted((locations.CONF_DIR / group).glob("*.yaml")):
            documented = _documented(option)
            for key in (k for k in leaves if k.startswith(f"{group}.")):
                short = key.split(".", 1)[1]
                assert short in documented, f"{key} missing from {option}"
                assert documented[short][1], f"{key} has no comment in {option}"


def _plan_problems(*overrides: str) -> list[str]:
    from finetune.compose.prepare import compose_config
    from finetune.training.plan import plan_run

    cfg, _ = compose_config(["recipe=quickstart", "weights.source=none", *overrides])
    return plan_run(cfg, load=False).problems


def test_plan_time_corrections_are_one_sentence_each() -> None:
    """Things that used to crash later, or train wrong, are refused when the run is planned."""
    assert _plan_problems("model.name=vit_b_16", "model.kwargs.image_size=224") == [
        "vit_b_16 cannot take 32 px inputs (Wrong image height! Expected 224 but got 32!); a "
        "ViT takes exactly its image_size (224 px here): set data.image_size=224, or "
        "model.kwargs.image_size=32"]
    assert _plan_problems("model.name=vit_b_16") == []  # built for the run's image size
    assert _plan_problems("data.augment=[MixUp]")[0].startswith(
        "data.augment[0]: MixUp mixes pairs of images and their labels across a batch")
    wrong_head = "surgery=[{op: replace, path: fc, with: {type: Linear, out_features: 3}}]"
    assert _plan_problems(wrong_head) == [
        "the model gives [3] outputs per image but the data has 5 classes: a surgery op "
        "replaced the classifier with another size; give it out_features: 5 (or leave the "
        "classifier to head.num_classes)"]
    # two problems of different kinds, reported together
    assert len(_plan_problems("head.num_classes=3", "freeze.train_from=layer9")) == 2


def test_model_kwargs_on_the_command_line_need_no_plus() -> None:
    cfg = compose_cfg("recipe=quickstart", "model.kwargs.zero_init_residual=true")
    assert cfg.model.kwargs.zero_init_residual is True
    errors = prepare_errors("data.channels=2")
    assert errors == ["override 'data.channels=2': data.channels=2 is not one of 1, 3"]


def prepare_errors(*overrides: str) -> list[str]:
    from finetune.errors import ConfigError

    try:
        prepare(["recipe=quickstart", *overrides])
    except ConfigError as err:
        return err.problems
    return []


def test_help_piped_into_head_is_quiet(tmp_path: Path) -> None:
    import subprocess
    import sys

    for module in ("finetune", "finetune.inspect"):
        shell = (f"{sys.executable} -m {module} --help | head -c 10 >/dev/null"
                 if module == "finetune" else
                 f"{sys.executable} -m {module} recipe=quickstart weights.source=none | true")
        done = subprocess.run(shell, shell=True, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_every_range_is_checked_and_written_beside_its_key() -> None:
    """Values that used to crash later or train nothing are refused, one line each, all
    together; conf/config.yaml states each range (the comment on the key's line)."""
    from finetune.compose.ranges import ENTRY_RANGES, ITEM_RANGES, RANGES

    problems = _plan_problems(
        "data.batch_size=0", "trainer.max_epochs=-1", "trainer.accumulate_grad_batches=0",
        "head.hidden=[0]", "data.image_size=0", "optim.lr=0",
        "optim.groups=[{modules: fc, lr: -0.1}]", "trainer.limit_train_batches=1.5",
        "freeze.unfreeze=[{epoch: -1, train_from: layer4}]")
    expected = {
        "data.batch_size=0: must be in [1, 65536]", "trainer.max_epochs=-1: must be >= 1",
        "trainer.accumulate_grad_batches=0: must be >= 1",
        "head.hidden[0]=0: must be in [1, 65536]",
        "data.image_size=0: must be in [8, 8192]", "optim.lr=0: must be > 0",
        "optim.groups[0].lr=-0.1: must be > 0",
        "freeze.unfreeze[0].epoch=-1: must be >= 0"}
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert any(p.startswith("trainer.limit_train_batches=1.5: a fraction of the batches must "
                            "be in (0, 1]") for p in problems)
    lines = (locations.CONF_DIR / "config.yaml").read_text().splitlines()
    for key, allowed in {**RANGES, **ITEM_RANGES}.items():
        leaf, depth = key.split(".")[-1], key.count(".")
        if key.startswith("data."):  # the data group's keys: in each of its option files
            for option in sorted((locations.CONF_DIR / "data").glob("*.yaml")):
                line = next(x for x in option.read_text().splitlines()
                            if x.startswith("  " * (depth - 1) + leaf + ":"))
                assert allowed.text() in line.partition("#")[2], (option, key, line)
            continue
        section = lines.index(next(x for x in lines if x.startswith(key.split(".")[0] + ":")))
        line = next(x for x in lines[section:] if x.startswith("  " * depth + leaf + ":"))
        assert allowed.text() in line.partition("#")[2], (key, allowed.text(), line)
    for key, entry_fields in ENTRY_RANGES.items():
        section = lines.index(next(x for x in lines if x.startswith(key.split(".")[0] + ":")))
        line = next(x for x in lines[section:] if x.startswith("  " * key.count(".")
                                                               + key.split(".")[-1] + ":"))
        for name, allowed in entry_fields.items():
            assert f"{name} {allowed.text()}" in line, (key, name, line)


def test_mappings_take_new_keys_from_the_command_line() -> None:
    """model.kwargs={dropout: 0.2} (and data.limit_per_class={8: 18}, weights.rename={..})
    failed with Hydra's "Key 'dropout' is not in struct"; a mapping of free keys takes them
    whole or one at a time."""
    from finetune.compose.prepare import compose_with_hydra

    cfg = compose_with_hydra(["recipe=quickstart", "model.kwargs={dropout: 0.2}",
                              "data.limit_per_class={8: 18}", "weights.rename.a=b"])
    assert cfg.model.kwargs == {"dropout": 0.2} and cfg.weights.rename == {"a": "b"}
    assert dict(cfg.data.limit_per_class) == {8: 18}


def test_values_that_would_exhaust_memory_are_one_sentence() -> None:
    """Upper bounds where memory is at stake, and the plan's floor against this machine."""
    from finetune.compose.precheck import config_problems, machine_memory, memory_floor
    from finetune.compose.prepare import compose_config

    problems = _plan_problems("data.image_size=50000", "head.num_classes=1000000",
                              "head.hidden=[100000]", "data.batch_size=1000000",
                              "data.max_image_pixels=100000000000")
    for start in ("data.image_size=50000: must be in [8, 8192]",
                  "head.num_classes=1000000: must be in [1, 100000]",
                  "head.hidden[0]=100000: must be in [1, 65536]",
                  "data.batch_size=1000000: must be in [1, 65536]",
                  "data.max_image_pixels=100000000000: must be in [1, 1073741824]"):
        assert any(p.startswith(start) for p in problems), (start, problems)
    memory = machine_memory()
    assert memory is not None and memory > 2**30  # Linux tells
    # inside every bound, and still far past any machine: a batch and a deep wide head
    for overrides in (["data.image_size=8192", "data.batch_size=65536"],
                      ["head.num_classes=100000", f"head.hidden=[{','.join(['65536'] * 300)}]"]):
        cfg, _ = compose_config(["recipe=quickstart", "weights.source=none", *overrides])
        assert memory_floor(cfg, 100_000) > 16 * memory
        found = [p for p in config_problems(cfg) if "GiB of memory" in p]
        assert len(found) == 1 and "this machine has" in found[0], found
    cfg, _ = compose_config(["recipe=quickstart", "weights.source=none"])
    assert not [p for p in config_problems(cfg) if "GiB of memory" in p]
    assert memory_floor(cfg, 10) < 2**30


def test_a_value_the_shell_split_at_a_space_is_one_sentence() -> None:
    """`data.limit_per_class={8: 18}` typed without quotes reaches finetune as two words; the
    answer says so (it was Hydra's "no viable alternative at input"), for every bracket."""
    from finetune.errors import ConfigError

    for words, shown in ((["data.limit_per_class={8:", "18}"], "data.limit_per_class={8:"),
                         (["head.hidden=[64,", "32]"], "head.hidden=[64,"),
                         (["model.kwargs={dropout:", "0.2}"], "model.kwargs={dropout:")):
        with pytest.raises(ConfigError) as refused:
            prepare(["recipe=quickstart", *words])
        assert refused.value.problems == [
            f"command line: {shown!r} is cut short: the shell splits a value at its spaces; put "
            f"the whole override in quotes ('{shown} ...') or write it without spaces"]
    assert prepare(["recipe=quickstart", "data.limit_per_class={8: 18}"])  # quoted: one word


def test_the_terminal_reads_plain_lines_and_warnings_say_so() -> None:
    import logging

    from finetune.training.quiet import TerminalFormatter

    def line(level: int, text: str) -> str:
        record = logging.LogRecord("finetune", level, __file__, 1, text, None, None)
        return TerminalFormatter().format(record)

    assert line(logging.INFO, "plan: train from layer4") == "finetune: plan: train from layer4"
    assert line(logging.WARNING, "no space left") == "finetune: warning: no space left"
    assert line(logging.ERROR, "x") == "finetune: error: x"
