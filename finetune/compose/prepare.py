"""The torch-free front of every command: argv and recipes -> a gated config Hydra composes.

`prepare` takes the command line, resolves `recipe=NAME|PATH` and `rerun=RUN_DIR`, reads each
recipe (and its `extends:` chain) through the gate, registers it with Hydra's ConfigStore and
checks the command line's own keys, reporting every problem at once. `compose_config` then
composes with Hydra as the CLI would. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune import locations, plugins
from finetune.compose import gate, override_checks, safe_files, schema
from finetune.errors import ConfigError, FinetuneError
from finetune.locations import resolve_recipe
from finetune.rundir import artifacts
from finetune.rundir.manifest import Manifest

log = logging.getLogger("finetune")


def load_recipe(path: Path, chain: tuple[Path, ...] = (), drop: frozenset[str] = frozenset()
                ) -> Any:
    """Read a recipe file as plain data (no resolvers run, no code imported), through the gate.

    The file is read bounded and safely (finetune.safe_files) and must pass finetune.gate;
    `extends: BASE` (a recipe name, or a path relative to this file) starts from BASE, which
    passes the same gate, and overrides only what this file sets; chains work, cycles and
    missing bases fail. `description:` is the one-line summary `finetune.recipes list` shows.

    Args:
        drop: dotted keys left out (validate's second look past values it already refused).

    Raises:
        ConfigError: every problem the gate found in this file (or its first broken base).
    """
    body = safe_files.load_yaml(path, "recipe")
    for key in drop:
        _drop_key(body, key.split("."))
    problems = gate.recipe_problems(body, str(path))
    if problems:
        raise ConfigError(problems)
    body = dict(body or {})
    body.pop("description", None)
    base = body.pop("extends", None)  # plain text (the gate refused interpolations in it)
    node = OmegaConf.create(body)
    if node.get("head", "") in ("none", None):  # `head: none` is short for head.type: none
        node.head = {"type": "none"}
    if base is not None:
        node = _extend(path, str(base), node, chain, drop)
    return node


def _drop_key(node: Any, parts: list[str]) -> None:
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def _extend(path: Path, base: str, node: Any, chain: tuple[Path, ...],
            drop: frozenset[str] = frozenset()) -> Any:
    """`node` on top of the recipe it extends: mappings merge, lists and values replace, and
    the defaults lists join (this file's entries win for the same group)."""
    try:
        _, base_path = resolve_recipe(base, cwd=path.parent)
    except ConfigError as err:
        raise ConfigError([f"{path}: extends: {base}: {err.problems[0]}"]) from None
    here = (*chain, path.resolve())
    if base_path.resolve() in here:
        cycle = " -> ".join(p.name for p in (*here, base_path))
        raise ConfigError([f"{path}: extends makes a cycle ({cycle}); remove one of them"])
    parent = load_recipe(base_path, here, drop)
    defaults: dict[str, Any] = {}
    for entry in [*parent.get("defaults", []), *node.get("defaults", [])]:
        key = next(iter(entry)) if OmegaConf.is_dict(entry) else str(entry)
        defaults[key] = entry
    merged = OmegaConf.merge(parent, node)
    if defaults:
        merged.defaults = list(defaults.values())
    return merged


def register_recipe(name: str, path: Path, drop: frozenset[str] = frozenset()) -> None:
    """Make `recipe=name` select the file, merged at the top level like `# @package _global_`."""
    register_recipe_node(name, load_recipe(path, drop=drop))


def register_recipe_node(name: str, node: Any) -> None:
    """Make `recipe=name` select `node` (a mapping of keys), merged at the top level."""
    ConfigStore.instance().store(group="recipe", name=name, node=node, package="_global_")


# Hydra flags that take the next argv token as their value.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--info", "--experimental-rerun"}


# Free-form mappings of the schema: their keys are the user's, not Hydra's to know.
FREE_FORM = ("model.kwargs", "model.detector.kwargs", "weights.rename",
             "data.limit_per_class")  # mappings of any keys


# Recipe name -> file, for the recipe(s) this process was asked to run (read by the manifest).
RECIPE_FILES: dict[str, Path] = {}


# Recipe name -> the run dir it reruns (`rerun=RUN_DIR`).
RERUN_OF: dict[str, Path] = {}


# Lightning's DDP launcher starts the other ranks with this process's (prepared) argv, where a
# recipe given as a path or a rerun is a registered name: they find it through the env.
RECIPES_OF_RUN_ENV = "FINETUNE_RUN_RECIPES"


def split_overrides(argv: list[str]) -> list[int]:
    """Indices of the `key=value` overrides in argv (not Hydra's flags or their values)."""
    indices, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
        elif token in _FLAGS_WITH_VALUE:
            skip = True
        elif not token.startswith("-") and "=" in token:
            indices.append(i)
    return indices


def inherited_recipes() -> dict[str, Any]:
    """The recipe files and reruns the process that started this one registered."""
    return json.loads(os.environ.get(RECIPES_OF_RUN_ENV, "{}"))


def prepare(argv: list[str], cwd: Path | None = None, drop: frozenset[str] = frozenset()
            ) -> list[str]:
    """Register the schema and the recipes, check the recipe and overrides, return Hydra's argv.

    Raises:
        ConfigError: every problem found, one line each.
    """
    plugins.load()  # installed extensions are choices too
    RECIPE_FILES.clear()
    RERUN_OF.clear()
    schema.register_schema()
    schema.register_base_recipe()
    problems: list[str] = []
    inherited = inherited_recipes()
    for name, path in inherited.get("files", {}).items():
        problems += _register(name, Path(path))
    for name, run in inherited.get("reruns", {}).items():
        register_rerun(Path(run), name)
    argv = rerun_argv([a for a in argv if a.partition("=")[0].lstrip("+") not in drop])
    overrides = split_overrides(argv)
    for i in overrides:
        key, _, value = argv[i].partition("=")
        if key.lstrip("+") != "recipe":
            continue
        names = []
        for one in value.split(","):  # `-m recipe=a,b` sweeps over recipes
            if one.strip() in (schema.BASE_RECIPE, *RERUN_OF, *inherited.get("files", {})):
                names.append(one.strip())  # registered already, not a file
                continue
            name, path = locations.resolve_recipe(one.strip(), cwd)
            problems += _register(name, path, drop)
            names.append(name)
        argv[i] = f"{key}={','.join(names)}"
    for i in overrides:
        if argv[i] in ("head=none", "head=null"):  # short for head.type=none, as in recipes
            argv[i] = "head.type=none"
        elif any(argv[i].startswith((f"{k}.", f"{k}=")) for k in FREE_FORM):
            # model.kwargs.dropout=0.2 (as README writes it) or model.kwargs={dropout: 0.2}:
            # Hydra wants ++ for a key its mapping does not have yet
            argv[i] = f"++{argv[i]}"
        argv[i] = home_expanded(argv[i])
    problems += override_checks.check_overrides([argv[i] for i in overrides
                                        if argv[i].partition("=")[0].lstrip("+") != "recipe"])
    if problems:
        raise ConfigError(problems)
    return argv


def home_expanded(override: str) -> str:
    """`data.root=~/photos` as a shell user means it: the home folder expanded, the path
    quoted (Hydra's grammar reads a bare `~` as "delete this key" and stops)."""
    key, sep, value = override.partition("=")
    if not sep or not (value == "~" or value.startswith(("~/", "~" + os.sep))):
        return override
    path = os.path.expanduser(value)
    return f"{key}='{path}'" if "'" not in path else f'{key}="{path}"'


def _register(name: str, path: Path, drop: frozenset[str] = frozenset()) -> list[str]:
    """Register a recipe file (read through the gate) as `recipe=name`; its problems."""
    try:
        register_recipe(name, path, drop)
    except FinetuneError as err:
        return err.problems
    RECIPE_FILES[name] = path
    return []


def rerun_argv(argv: list[str]) -> list[str]:
    """`rerun=RUN_DIR`: the run's resolved config (from its manifest; for a run that stopped
    before writing one, Hydra's .hydra/config.yaml) becomes the recipe, so the run dir alone
    reproduces or continues it (`rerun=RUN_DIR resume=RUN_DIR`); other overrides still apply."""
    reruns = [a for a in argv if a.startswith("rerun=")]
    if not reruns:
        return argv
    name = register_rerun(Path(reruns[0].partition("=")[2]).expanduser())
    return [f"recipe={name}", *(a for a in argv if not a.startswith(("rerun=", "recipe=")))]


def register_rerun(run: Path, name: str | None = None) -> str:
    """Register a run dir's config as the recipe `<recipe>_rerun`; returns the name.

    A run dir from someone else is untrusted: its recorded config passes the same gate as a
    recipe. Keys that only the command line may set (freeze.cache_dir) are not taken from it.
    """
    manifest, composed = run / "manifest.json", run / ".hydra" / "config.yaml"
    if manifest.is_file():
        where = str(manifest)
        recorded = Manifest.from_json(safe_files.load_json_object(manifest, "manifest"), where)
        config, recipe = recorded.config, recorded.recipe.get("name")
    elif composed.is_file():
        config = safe_files.load_yaml(composed, "recorded config")
        hydra_file = run / ".hydra" / "hydra.yaml"
        recorded_hydra = safe_files.load_yaml(hydra_file, "recorded Hydra config") \
            if hydra_file.is_file() else None
        recipe = _select(recorded_hydra, "hydra", "runtime", "choices", "recipe")
        where = str(composed)
    else:
        raise ConfigError([f"rerun={run}: no manifest.json or .hydra/config.yaml there; give "
                           "the dir of a run"])
    if not isinstance(config, dict):
        raise ConfigError([f"{where}: holds no recorded config; give the dir of a run"])
    config = dict(config)
    for key in gate.CLI_ONLY:
        group, _, leaf = key.partition(".")
        if isinstance(config.get(group), dict) and config[group].get(leaf) not in (None, False):
            log.info("rerun: %s=%s is not taken from a run dir; set it on the command line",
                     key, config[group][leaf])
            config[group] = {k: v for k, v in config[group].items() if k != leaf}
    problems = gate.recipe_problems(config, where)  # a recorded config is a recipe
    if problems:
        raise ConfigError(problems)
    if not (isinstance(recipe, str) and locations.RECIPE_NAME.fullmatch(recipe)):
        recipe = schema.BASE_RECIPE  # a name becomes part of a path: only a plain one
    name = name or f"{recipe}_rerun"
    register_recipe_node(name, config)
    RERUN_OF[name] = run.resolve()
    return name


def _select(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def recipe_record(name: str | None, recipe_files: dict[str, Path],
                  rerun_of: dict[str, Path]) -> dict[str, Any]:
    """What the manifest says of the recipe: its name, file and sha256 (and the run dir a
    rerun reruns)."""
    path = recipe_files.get(name) if name else None
    recipe = {"name": name, "file": str(path) if path else None,
              "sha256": artifacts.file_sha256(path) if path else None}
    if name in rerun_of:
        recipe["rerun_of"] = str(rerun_of[name])
    return recipe


def sweeper_problem(hydra_cfg: Any, metric: str) -> str | None:
    """A sweeper that optimizes (Optuna) must pull the way `metric` improves."""
    sweeper = hydra_cfg.sweeper
    if "optuna" not in str(sweeper.get("_target_", "")).lower():
        return None
    direction = sweeper.get("direction")
    direction = str(getattr(direction, "name", direction)).lower()
    expected = "minimize" if metric.endswith("loss") else "maximize"
    if direction != expected:
        return (f"hydra.sweeper.direction={direction} but the jobs return metric={metric}, "
                f"which is better {'lower' if expected == 'minimize' else 'higher'}; set "
                f"hydra.sweeper.direction={expected} (or pick another metric)")
    return None


def compose_with_hydra(overrides: list[str], drop: frozenset[str] = frozenset()) -> DictConfig:
    """The config a run with these overrides would get, Hydra's own part included (checked
    as a run checks it: the gate, the schema). `drop`: keys left at their defaults."""
    args = prepare(overrides, drop=drop)
    with initialize_config_dir(str(locations.CONF_DIR), version_base="1.3", job_name="inspect"):
        try:
            return compose("config", overrides=args, return_hydra_config=True)
        except HydraException as err:  # e.g. an Optuna setting without sweep=optuna
            cause = err.__cause__ or err
            raise ConfigError([f"the config does not compose: "
                               f"{' '.join(str(cause).split())}"]) from None


def compose_config(overrides: list[str]) -> tuple[DictConfig, str]:
    """The config a run with these overrides would get (checked as a run checks it), and the
    name of the recipe chosen."""
    cfg = compose_with_hydra(overrides)
    recipe = cfg.hydra.runtime.choices.recipe
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, recipe
