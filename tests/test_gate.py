"""A received recipe is data: one gate, deny by default, before Hydra composes anything.

Each attack below once worked (or would work without the gate); each test plants a marker that
must not appear, and `recipes validate` must refuse the same file."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finetune.commands.recipes import validate_recipe
from finetune.compose import gate, safe_files
from finetune.compose.prepare import prepare
from finetune.errors import ConfigError, FinetuneError
from tests.conftest import cli_errors, run_cli


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _logging(handler: str) -> str:
    """A logging dictConfig under `hydra.job_logging:` (indented for that)."""
    return ("    version: 1\n    handlers:\n" f"      x: {handler}\n"
            "    root: {handlers: [x], level: INFO}\n")


class Pickled:
    """What `--experimental-rerun FILE` would unpickle: touching the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def attacks(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (recipe file, a fragment of the refusal). Markers go to tmp/outside/."""
    out = tmp / "outside"
    pickle_file = tmp / "evil.pkl"
    pickle_file.write_bytes(pickle.dumps(Pickled(out / "unpickled")))
    file_handler = f"{{class: logging.FileHandler, filename: {out / 'job.log'}}}"
    factory = f"{{'()': logging.FileHandler, filename: {out / 'factory.log'}}}"
    return {
        "job_logging": (_write(tmp / "job_logging.yaml",
                               f"hydra:\n  job_logging:\n{_logging(file_handler)}"),
                        "hydra.job_logging cannot be set in a received recipe"),
        "hydra_logging": (_write(tmp / "hydra_logging.yaml",
                                 f"hydra:\n  hydra_logging:\n{_logging(factory)}"),
                          "hydra.hydra_logging cannot be set in a received recipe"),
        "logging_group": (_write(tmp / "logging_group.yaml",
                                 "defaults:\n  - override /hydra/job_logging: stdout\n"),
                          "a recipe may choose only the groups"),
        "experimental_rerun": (_write(tmp / "rerun_flag.yaml", (
            "weights:\n  source: recipe\n  recipe: quickstart\n"
            f"  recipe_overrides: [--experimental-rerun, {pickle_file}]\n")),
            "'--experimental-rerun' is a command-line flag"),
        "allow_module": (_write(tmp / "allow_flag.yaml", (
            "weights:\n  source: recipe\n  recipe: quickstart\n"
            "  recipe_overrides: ['--allow-module=os']\n")),
            "is a command-line flag"),
        "override_hydra": (_write(tmp / "override_hydra.yaml", (
            "weights:\n  source: recipe\n  recipe: quickstart\n"
            f"  recipe_overrides: ['hydra.job_logging.handlers.x.filename={out / 'o.log'}']\n")),
            "hydra.job_logging.handlers.x.filename cannot be set from a received file"),
        "sweep_hydra": (_write(tmp / "sweep_hydra.yaml", (
            "hydra:\n  sweeper:\n    params:\n"
            f"      hydra.job_logging.handlers.x.filename: {out / 's.log'}\n")),
            "cannot be set from a received file"),
        "sweep_cli_only": (_write(tmp / "sweep_cache.yaml", (
            "hydra:\n  sweeper:\n    params:\n"
            f"      freeze.cache_dir: {out},{out / 'b'}\n")),
            "freeze.cache_dir cannot be set in a received recipe"),
        "run_dir_outside": (_write(tmp / "run_dir.yaml",
                                   f"hydra:\n  run:\n    dir: {out / 'run'}\n"),
                            "must be a relative path inside the working directory"),
        "run_dir_dotdot": (_write(tmp / "run_dir_up.yaml",
                                  "hydra:\n  sweep:\n    dir: outputs/../../outside\n"),
                           "no leading /, ~ or .."),
        # ${now:...} prints its format: a path in it is a path, not a date
        "now_absolute": (_write(tmp / "now_abs.yaml",
                                f"hydra:\n  run:\n    dir: '${{now:{out / 'now'}}}'\n"),
                         "${now:...} formats hold only strftime's date and time directives"),
        "now_dotdot": (_write(tmp / "now_up.yaml",
                              "hydra:\n  sweep:\n    dir: 'x/${now:../../outside}'\n"),
                       "${now:...} formats hold only"),
        "now_home": (_write(tmp / "now_home.yaml",
                            "hydra:\n  sweep:\n    subdir: '${now:~/outside}'\n"),
                     "${now:...} formats hold only"),
        "now_slash_directive": (_write(tmp / "now_d.yaml",
                                       "hydra:\n  run:\n    dir: 'out/${now:%D}'\n"),
                                "${now:...} formats hold only"),
        "now_joined_dots": (_write(tmp / "now_dots.yaml",
                                   "hydra:\n  run:\n    dir: 'a/${now:.}${now:.}/../..'\n"),
                            "no leading /, ~ or .."),
        "dotted_top_key": (_write(tmp / "dotted.yaml",
                                  "model.kwargs.checkpoint_path: /x/model.pth\n"),
                           "has the dotted key 'model.kwargs.checkpoint_path'"),
        "dotted_hydra_key": (_write(tmp / "dotted_hydra.yaml",
                                    f"hydra:\n  run.dir: {out / 'run'}\n"),
                             "has the dotted key 'run.dir'"),
        "dotted_sweep_kwargs": (_write(tmp / "sweep_kwargs.yaml", (
            "hydra:\n  sweeper:\n    params:\n"
            "      model.kwargs.checkpoint_path: /x/a.pth,/x/b.pth\n")),
            "the builder would load weights by itself"),
        "dotted_enqueue_kwargs": (_write(tmp / "enqueue_kwargs.yaml", (
            "hydra:\n  sweeper:\n    enqueue:\n"
            "      - {model.kwargs.checkpoint_path: /x/a.pth}\n")),
            "the builder would load weights by itself"),
        "dotted_override_kwargs": (_write(tmp / "overrides_kwargs.yaml", (
            "weights:\n  source: recipe\n  recipe: quickstart\n"
            "  recipe_overrides: ['model.kwargs.checkpoint_path=/x/a.pth']\n")),
            "the builder would load weights by itself"),
        "extends_env": (_write(tmp / "extends_env.yaml", "extends: ${oc.env:HOME}\n"),
                        "extends='${oc.env:HOME}': plain text only"),
        "description_resolver": (_write(tmp / "description.yaml",
                                        "description: '${nosuch:x}'\n"),
                                 "description='${nosuch:x}': plain text only"),
        "sweep_glob": (_write(tmp / "glob.yaml",
                              "hydra:\n  sweeper:\n    params:\n      optim.lr: glob(*)\n"),
                       "glob() picks among a config group's options"),
        "cache_dir": (_write(tmp / "cache_dir.yaml", f"freeze:\n  cache_dir: {out}\n"),
                      "freeze.cache_dir cannot be set in a received recipe"),
        "env_resolver": (_write(tmp / "env.yaml", "data:\n  root: ${oc.env:HOME}\n"),
                         "may interpolate only schema keys"),
        "torchvision_by_itself": (_write(tmp / "kwargs_weights.yaml",
                                         "model:\n  kwargs:\n    weights: IMAGENET1K_V1\n"),
                                  "the builder would load weights by itself"),
        "launcher_setup": (_write(tmp / "launcher.yaml", (
            "defaults:\n  - override /hydra/launcher: slurm\n"
            f"hydra:\n  launcher:\n    setup: ['touch {out / 'slurm'}']\n")),
            "hydra.launcher.setup cannot be set"),
        "partition_newline": (_write(tmp / "partition.yaml", (
            "hydra:\n  launcher:\n    partition: \"gpu\\ntouch /tmp/x\"\n")),
            "hydra.launcher.partition="),
        "python_tag": (_write(tmp / "tag.yaml",
                              f"seed: !!python/object/apply:os.system ['touch {out / 'tag'}']\n"),
                       "a tag recipes may not use"),
        "alias_bomb": (_write(tmp / "bomb.yaml", "\n".join(
            ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
            + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)])
            + "\n"), "expands to more than 100,000 values"),
    }


def test_every_attack_is_refused_by_run_and_by_validate(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name, (recipe, fragment) in attacks(tmp_path).items():
        with pytest.raises(FinetuneError) as refused:
            prepare([f"recipe={recipe}"])
        assert any(fragment in line for line in refused.value.problems), (name, refused.value)
        problems, effects = validate_recipe(str(recipe), [])
        assert any(fragment in line for line in problems), (name, problems)
        assert effects == []
    assert not (tmp_path / "outside").exists()


def test_a_logging_config_in_a_recipe_never_reaches_hydra(tmp_path: Path) -> None:
    """The true CLI: Hydra configures logging in hydra.main, after our gate ran."""
    out = tmp_path / "outside"
    recipe = _write(tmp_path / "shared.yaml", "hydra:\n  job_logging:\n" + _logging(
        f"{{class: logging.FileHandler, filename: {out / 'job.log'}}}"))
    errors = cli_errors(run_cli(f"recipe={recipe}", cwd=tmp_path))
    assert errors == [f"finetune: error: {recipe}: hydra.job_logging cannot be set in a received "
                      "recipe or run dir (it could run code or write outside the run dir); a "
                      "recipe may set only hydra.run.dir, hydra.sweep.dir/subdir, "
                      "hydra.sweeper.params and the search's size (docs/security.md lists "
                      "them); set others on the command line if you mean it"]
    assert not out.exists() and not (tmp_path / "outputs").exists()
    result = run_cli("validate", str(recipe), cwd=tmp_path, module="finetune.recipes")
    assert len(cli_errors(result, "finetune recipes: error:")) == 1


def test_a_bad_extends_base_is_refused_too(tmp_path: Path) -> None:
    base = _write(tmp_path / "base_evil.yaml", "hydra:\n  callbacks:\n    x: {_target_: os.x}\n")
    child = _write(tmp_path / "child.yaml", "extends: base_evil.yaml\nseed: 3\n")
    with pytest.raises(ConfigError) as refused:
        prepare([f"recipe={child}"])
    assert refused.value.problems[0].startswith(f"{base}: hydra.callbacks cannot be set")


def test_a_source_recipes_overrides_are_checked_where_they_become_argv(tmp_path: Path) -> None:
    """Defence in depth: whatever supplied them (a recipe, a run dir, the command line),
    recipe_overrides entries are refused before a child process is started."""
    from finetune.weights.readers import read_recipe

    marker = tmp_path / "unpickled"
    pickle_file = tmp_path / "evil.pkl"
    pickle_file.write_bytes(pickle.dumps(Pickled(marker)))
    with pytest.raises(ConfigError) as refused:
        read_recipe("quickstart", ["--experimental-rerun", str(pickle_file), "seed=1"])
    assert [p.split(":")[0] for p in refused.value.problems] == [
        "weights.recipe_overrides[0]", "weights.recipe_overrides[1]"]
    assert not marker.exists()


def test_shipped_recipes_and_searches_pass_the_gate() -> None:
    """The gate allows what the project ships: a split sweep and an Optuna search."""
    from finetune import locations

    for name, path in locations.shipped_recipes().items():
        assert gate.recipe_problems(safe_files.load_yaml(path), name) == []
    optuna = {"defaults": [{"override /hydra/sweeper": "finetune_optuna"},
                           {"sweep": "splits"}],
              "hydra": {"sweeper": {"direction": "maximize", "n_trials": 5,
                                    "sampler": {"seed": "${seed}"}, "params": {
                                        "optim.lr": "tag(log, interval(1e-4, 1e-2))",
                                        "freeze.train_from": "choice(layer3,layer4,fc)",
                                        "data": "digits,fake"}},
                        "run": {"dir": "runs/${hydra.runtime.choices.recipe}/${now:%H}"}}}
    assert gate.recipe_problems(optuna, "search") == []


# The fields a manifest must have besides its config (finetune.manifest.Manifest).
MANIFEST = {"model": {"name": "resnet18", "build_kwargs": {}},
            "head": {"type": "classifier", "num_classes": 2, "dropout": 0.0, "hidden": []},
            "surgery": [], "output_shape": [2], "class_names": ["a", "b"],
            "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
            "model_sha256": "0" * 64}


def test_rerun_of_a_received_run_dir_is_gated(tmp_path: Path) -> None:
    """A run dir's recorded config is a recipe: hydra settings planted in it are refused,
    from the manifest and from .hydra/config.yaml alike."""
    import json

    out = tmp_path / "outside"
    planted = {"seed": 1, "hydra": {"job_logging": {"version": 1, "handlers": {"x": {
        "class": "logging.FileHandler", "filename": str(out / "x.log")}}}}}
    run = tmp_path / "received"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(json.dumps(planted))
    with pytest.raises(ConfigError, match=r"hydra\.job_logging cannot be set"):
        prepare([f"rerun={run}"])
    (run / "manifest.json").write_text(json.dumps({**MANIFEST, "config": planted, "recipe": {
        "name": "../../x"}}))
    with pytest.raises(ConfigError, match=r"hydra\.job_logging cannot be set"):
        prepare([f"rerun={run}"])
    (run / "manifest.json").write_text('{"config": {"seed": 1')  # truncated
    with pytest.raises(FinetuneError, match=r"manifest .*manifest.json: not valid JSON"):
        prepare([f"rerun={run}"])
    # a clean recorded config reruns; a path-like recipe name does not become a path
    (run / "manifest.json").write_text(json.dumps({**MANIFEST, "config": {"seed": 1, "freeze": {
        "cache_dir": str(out)}}, "recipe": {"name": "../../x"}}))
    assert prepare([f"rerun={run}"])[0] == "recipe=base_rerun"
    assert not out.exists()


def test_yaml_and_json_are_read_bounded(tmp_path: Path) -> None:
    big = _write(tmp_path / "big.yaml", "a: " + "x" * (safe_files.MAX_YAML_BYTES + 1))
    with pytest.raises(safe_files.UnsafeFile, match="larger than 1024 KiB"):
        safe_files.load_yaml(big)
    loop = _write(tmp_path / "loop.yaml", "a: &a [*a]\n")
    with pytest.raises(safe_files.UnsafeFile, match="refers to itself"):
        safe_files.load_yaml(loop)
    # aliases may add a little (an anchor reused), never multiply a small file
    small_bomb = _write(tmp_path / "small_bomb.yaml", "model:\n  kwargs:\n" + "".join(
        f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else '1'] * 10)}]\n"
        for i in range(3)))
    assert len(small_bomb.read_bytes()) < 250
    with pytest.raises(safe_files.UnsafeFile, match=r"its YAML aliases add 1,220 values to the"):
        safe_files.load_yaml(small_bomb)
    reused = _write(tmp_path / "reused.yaml", "data:\n  mean: &m [0.5, 0.5, 0.5]\n"
                    "  std: *m\nhead:\n  hidden: &h [64, 32]\nmodel:\n  kwargs: {x: *h}\n")
    assert safe_files.load_yaml(reused)["data"]["std"] == [0.5, 0.5, 0.5]
    deep = _write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(safe_files.UnsafeFile, match="nested too deeply"):
        safe_files.load_json(deep)
    for text in ("", "{", "[1, 2]", "\xff\xfe"):
        path = tmp_path / "m.json"
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(safe_files.UnsafeFile, match=f"manifest {path}: "):
            safe_files.load_json_object(path)


# ---------------------------------------------------------------------------------------
# The property: whatever a received recipe says in `hydra:` or its overrides, the gate either
# refuses it or what it lets through calls nothing importable and writes nothing outside.

MARKER_MODULE = "finetune_gate_marker"


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An importable module whose every use leaves a file: if a gated recipe ever reaches an
    import or a call, the test sees it."""
    folder = tmp_path_factory.mktemp("marker")
    (folder / f"{MARKER_MODULE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(folder / 'imported')!r}).touch()\n"
        "def touch(*args, **kwargs):\n"
        f"    Path({str(folder / 'called')!r}).touch()\n"
        "class Handler:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        touch()\n")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


HYDRA_SPACE = ["run.dir", "sweep.dir", "sweep.subdir", "sweeper.params", "sweeper.n_trials",
               "sweeper._target_", "sweeper.storage", "sweeper.custom_search_space",
               "sweeper.sampler._target_", "launcher._target_", "launcher.setup",
               "launcher.partition", "launcher.n_jobs", "callbacks.x._target_", "searchpath",
               "output_subdir", "job.env_set.X", "job.chdir", "job.name", "verbose",
               "job_logging", "hydra_logging", "help.template", "mode", "runtime.cwd"]


def _dictconfig(outside: Path) -> st.SearchStrategy:
    callables = st.sampled_from([f"{MARKER_MODULE}.touch", f"{MARKER_MODULE}.Handler",
                                 "logging.FileHandler", "logging.StreamHandler"])
    handler = st.fixed_dictionaries({}, optional={
        "()": callables, "class": callables,
        "filename": st.just(str(outside / "handler.log")),
        "stream": st.just("ext://sys.stdout")})
    return st.fixed_dictionaries({"version": st.just(1), "handlers": st.fixed_dictionaries(
        {"h": handler}), "root": st.just({"handlers": ["h"]})})


def _values(outside: Path) -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from([1, 0, -3, True, None, "layer4", f"{outside}/x", "../up", "~/x",
                         "${oc.env:HOME}", "${seed}", "a,b", "choice(1,2)", f"{MARKER_MODULE}"
                         ".touch", "--experimental-rerun", "x\ny", "${now:%H}",
                         f"${{now:{outside}}}", "${now:../../x}", "${now:~/x}", "${now:%D}",
                         "a/${now:..}", "${now:.}${now:.}/x", "${nosuch:x}", "glob(*)"]),
        st.text(alphabet="abc./-_=${}:~,+ \n", max_size=12))


def _override_text() -> st.SearchStrategy:
    keys = st.sampled_from(["seed", "optim.lr", "freeze.cache_dir", "hydra.run.dir",
                            "hydra.job_logging.root.level", "recipe", "+extra", "~seed",
                            "--allow-module", "data", "freeze.train_from", "model.kwargs.x"])
    return st.one_of(st.builds(lambda k, v: f"{k}={v}", keys,
                               st.sampled_from(["1", "a,b", "/tmp/x", "${oc.env:HOME}",
                                                "[--cfg,job]", "layer4", "fake", "x=y"])),
                     st.text(alphabet="abs.=-+~@,/$ {}", max_size=16))


@st.composite
def hydra_recipes(draw: st.DrawFn, outside: Path) -> dict:
    hydra: dict = {}
    for key in draw(st.lists(st.sampled_from(HYDRA_SPACE), max_size=4, unique=True)):
        node = hydra
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if key in ("job_logging", "hydra_logging"):
            node[leaf] = draw(_dictconfig(outside))
        elif key == "sweeper.params":
            node[leaf] = draw(st.dictionaries(st.sampled_from(
                ["seed", "freeze.cache_dir", "hydra.job_logging.root.level", "optim.lr",
                 "weights.recipe_overrides", "data"]), _values(outside), max_size=3))
        else:
            node[leaf] = draw(_values(outside))
    recipe: dict = {"hydra": hydra} if hydra else {}
    for dotted in draw(st.lists(st.sampled_from(["model.kwargs.checkpoint_path", "hydra.run.dir",
                                                 "run.dir", "sweep.dir"]), max_size=2)):
        # one key with dots: literal for OmegaConf, nested for a reader of the text
        (hydra if dotted in ("run.dir", "sweep.dir") else recipe)[dotted] = draw(_values(outside))
    if hydra and "hydra" not in recipe:
        recipe["hydra"] = hydra
    for key in draw(st.lists(st.sampled_from(["extends", "description"]), max_size=1)):
        recipe[key] = draw(_values(outside))
    if draw(st.booleans()):
        recipe["weights"] = {"recipe_overrides": draw(st.lists(_override_text(), max_size=3))}
    return recipe


def _refuses_what_it_must(recipe: dict, problems: list[str]) -> None:
    """Keys outside the closed list are always refused, by name."""
    allowed = {*gate.HYDRA_KEYS, gate.SWEEP_PARAMS}

    def leaves(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            path = f"{prefix}.{key}"
            if path in allowed or not isinstance(value, dict) or not value:
                out.append(path)
            else:
                out += leaves(value, path)
        return out

    for path in leaves(recipe.get("hydra", {}), "hydra"):
        if not any(path == a or path.startswith(f"{a}.") for a in allowed):
            assert any(path.split(".")[1] in p for p in problems), (path, problems)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(data=st.data())
def test_property_whatever_passes_the_gate_runs_nothing(data: st.DataObject, marker: Path,
                                                        tmp_path_factory: pytest.TempPathFactory
                                                        ) -> None:
    import logging

    from hydra.core.utils import configure_log
    from omegaconf import OmegaConf

    from finetune.compose.prepare import compose_with_hydra

    work = tmp_path_factory.mktemp("work")
    outside = work.parent / f"{work.name}_outside"
    recipe = data.draw(hydra_recipes(outside))
    problems = gate.recipe_problems(recipe, "recipe.yaml")
    _refuses_what_it_must(recipe, problems)
    for entry in recipe.get("weights", {}).get("recipe_overrides", []):
        entry_problems = gate.override_problems(entry, "entry")
        if not entry_problems:  # what passes is one key=value of a schema key, not a flag
            key = entry.split("=", 1)[0]
            assert not entry.startswith("-") and not key.startswith(("hydra", "+", "~"))
            assert key != "freeze.cache_dir"
    event("accepted by the gate" if not problems else "refused")
    if not problems:
        path = work / "recipe.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)))
        try:
            cfg = compose_with_hydra([f"recipe={path}"])
        except FinetuneError:
            cfg = None  # refused later (a schema check): nothing ran either
        if cfg is not None:
            from omegaconf import open_dict

            with open_dict(cfg):  # what hydra.main sets before it configures logging
                cfg.hydra.runtime.output_dir = str(work / "run")
                cfg.hydra.job.num = 0  # what a launcher sets for a sweep's first job
            (work / "run").mkdir()
            saved = logging.getLogger().handlers[:]
            try:  # what hydra.main does with the composed logging settings
                configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
                configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
            finally:
                logging.getLogger().handlers[:] = saved
            from finetune.compose.run_dirs import outside_problem

            for key, resolved in [("run", cfg.hydra.run.dir), ("sweep", cfg.hydra.sweep.dir),
                                  ("job", os.path.join(cfg.hydra.sweep.dir,
                                                       str(cfg.hydra.sweep.subdir)))]:
                assert outside_problem(key, resolved, work) is None, (recipe, resolved)
    assert MARKER_MODULE not in sys.modules
    assert not (marker / "imported").exists() and not (marker / "called").exists()
    assert not outside.exists()


def _composed_with_a_hole(recipe: dict, *overrides: str) -> Any:
    """The config Hydra composes for `recipe` registered *without* the gate (as if the gate
    had a hole): what the second line of defence sees."""
    from hydra import compose, initialize_config_dir

    from finetune import locations
    from finetune.compose import schema
    from finetune.compose.prepare import register_recipe_node

    schema.register_schema()
    schema.register_base_recipe()
    register_recipe_node("hole", recipe)
    with initialize_config_dir(str(locations.CONF_DIR), version_base="1.3", job_name="t"):
        return compose("config", overrides=["recipe=hole", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("key, start", [("run.dir", "on_run_start"),
                                        ("sweep.dir", "on_multirun_start"),
                                        ("run.dir", "on_job_start"),
                                        ("sweep.subdir", "on_job_start")])
def test_the_resolved_run_dir_is_checked_before_hydra_writes(
        key: str, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hydra._internal.callbacks import Callbacks
    from omegaconf import open_dict

    monkeypatch.chdir(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    group, leaf = key.split(".")
    mode = "MULTIRUN" if group == "sweep" else "RUN"
    extra = {"task_function": print} if start == "on_job_start" else {}
    up = "../" * 8  # past the working dir from a sweep's subdir too
    for value, refused in [(f"${{now:{outside}}}", True), (f"${{now:{up}%Y}}", True),
                           (f"${{now:%Y}}/{up}", True), ("out/${now:%Y-%m-%d}", False)]:
        cfg = _composed_with_a_hole({"hydra": {group: {leaf: value}}})
        with open_dict(cfg):
            cfg.hydra.mode = mode
            cfg.hydra.runtime.output_dir = (
                os.path.join(cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir) if mode == "MULTIRUN"
                else cfg.hydra.run.dir) if start == "on_job_start" else ""
        callbacks = Callbacks(cfg)  # as hydra.main makes them from conf/config.yaml
        if start == "on_multirun_start" and key != "sweep.dir":
            continue
        capsys.readouterr()
        if refused:
            with pytest.raises(SystemExit) as stopped:
                getattr(callbacks, start)(config=cfg, **extra)
            assert stopped.value.code == 2
            err = capsys.readouterr().err
            assert "outside the working directory" in err and "Traceback" not in err, err
        else:
            getattr(callbacks, start)(config=cfg, **extra)
    # the person's own hydra.run.dir=... is theirs
    cfg = _composed_with_a_hole({}, f"hydra.{key}={outside}")
    with open_dict(cfg):
        cfg.hydra.mode = mode
        cfg.hydra.runtime.output_dir = str(outside)
    getattr(Callbacks(cfg), start)(config=cfg, **extra)
    assert not outside.exists()


def test_a_glob_on_the_command_line_and_a_bad_revision_are_one_sentence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.compose.precheck import config_problems
    from finetune.compose.prepare import compose_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        prepare(["-m", "optim.lr=glob(*)"])
    assert refused.value.problems == [
        "override 'optim.lr=glob(*)': glob() picks among a config group's options and is not "
        "taken here; list the values (a,b,c or choice(a,b,c))"]
    for revision, ok in [("main", True), ("v1.0", True), ("refs/pr/3", True), ("a" * 40, True),
                         ("../../x", False), ("/etc", False), ("a/../b", False),
                         ("x y", False), ("x/", False)]:
        cfg, _ = compose_config([f"weights.revision='{revision}'"])
        problems = [p for p in config_problems(cfg) if p.startswith("weights.revision")]
        assert (problems == []) == ok, (revision, problems)
