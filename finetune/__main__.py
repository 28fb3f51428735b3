"""`python -m finetune recipe=NAME_OR_PATH [key=value ...]`: train from a recipe.

The steps, each logged: compose (Hydra) -> validate -> build -> plan -> fit -> save; see
finetune/training.py. Only the task imports torch, so `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune import config as schema
from finetune.allowlist import take_allow_flags
from finetune.cli import help_text
from finetune.errors import ConfigError, FinetuneError, run_entry_point

log = logging.getLogger("finetune")

# Hydra flags that take the next argv token as their value.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--info", "--experimental-rerun"}

# Free-form mappings of the schema: their keys are the user's, not Hydra's to know.
FREE_FORM = ("model.kwargs", "weights.rename", "data.limit_per_class")  # mappings of any keys
# Recipe name -> file, for the recipe(s) this process was asked to run (read by the manifest).
RECIPE_FILES: dict[str, Path] = {}
# Recipe name -> the run dir it reruns (`rerun=RUN_DIR`).
RERUN_OF: dict[str, Path] = {}
# Lightning's DDP launcher starts the other ranks with this process's (prepared) argv, where a
# recipe given as a path or a rerun is a registered name: they find it through the env.
RECIPES_OF_RUN_ENV = "FINETUNE_RUN_RECIPES"
LAUNCH_ENV = "FINETUNE_LAUNCHED"  # wall-clock time the command started: first_step_seconds


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
            name, path = schema.resolve_recipe(one.strip(), cwd)
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
    problems += schema.check_overrides([argv[i] for i in overrides
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
        schema.register_recipe(name, path, drop)
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
    from finetune import gate, safe_files

    manifest, composed = run / "manifest.json", run / ".hydra" / "config.yaml"
    if manifest.is_file():
        from finetune.manifest import Manifest

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
        if isinstance(config.get(group), dict) and config[group].get(leaf) is not None:
            log.info("rerun: %s=%s is not taken from a run dir; set it on the command line",
                     key, config[group][leaf])
            config[group] = {k: v for k, v in config[group].items() if k != leaf}
    problems = gate.recipe_problems(config, where)  # a recorded config is a recipe
    if problems:
        raise ConfigError(problems)
    if not (isinstance(recipe, str) and schema.RECIPE_NAME.fullmatch(recipe)):
        recipe = schema.BASE_RECIPE  # a name becomes part of a path: only a plain one
    name = name or f"{recipe}_rerun"
    schema.register_recipe_node(name, config)
    RERUN_OF[name] = run.resolve()
    return name


def _select(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def task(cfg: DictConfig) -> float:
    """One training job. Returns the monitored metric so Hydra sweepers can optimize it."""
    from finetune.artifacts import ERROR_FILE, remove_if_unused
    from finetune.precheck import config_problems

    if not RECIPE_FILES and not RERUN_OF:  # a launcher's worker process (joblib, submitit)
        inherited = inherited_recipes()
        RECIPE_FILES.update({k: Path(v) for k, v in inherited.get("files", {}).items()})
        RERUN_OF.update({k: Path(v) for k, v in inherited.get("reruns", {}).items()})
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode.name == "MULTIRUN"
    problem = sweeper_problem(hydra_cfg, cfg.metric) if sweep else None
    if problem:  # wrong for every job: stop the sweep before the first one trains
        report(ConfigError([problem]))
        raise SystemExit(2)
    if not sweep:  # what needs no torch is checked before torch is imported (a second, not
        problems = config_problems(cfg)  # most of a minute on a busy machine)
        if problems:
            report(ConfigError(problems))
            remove_if_unused(Path(hydra_cfg.runtime.output_dir))
            if full_error():
                raise ConfigError(problems)
            raise SystemExit(2)
    from finetune.training import run

    try:
        return run(cfg, run_context(hydra_cfg, RECIPE_FILES, RERUN_OF))
    except FinetuneError as err:
        report(err)
        if sweep:
            return math.nan  # the failed job is recorded in its dir; the sweep goes on
        if full_error():
            raise
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # outside fit (in fit, Lightning exits 1 itself)
        from finetune.callbacks import stop_name

        print(f"finetune: stopped by {stop_name(err)}; nothing was trained to resume from",
              file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        if not sweep:
            raise
        job_dir = Path(hydra_cfg.runtime.output_dir)
        print(f"finetune: error: job {hydra_cfg.job.num} failed ({type(err).__name__}: "
              f"{' '.join(str(err).split())[:300]}); traceback in {job_dir / ERROR_FILE}; "
              "the sweep goes on", file=sys.stderr)
        return math.nan


def recipe_record(name: str | None, recipe_files: dict[str, Path],
                  rerun_of: dict[str, Path]) -> dict[str, Any]:
    """What the manifest says of the recipe: its name, file and sha256 (and the run dir a
    rerun reruns)."""
    from finetune import artifacts

    path = recipe_files.get(name) if name else None
    recipe = {"name": name, "file": str(path) if path else None,
              "sha256": artifacts.file_sha256(path) if path else None}
    if name in rerun_of:
        recipe["rerun_of"] = str(rerun_of[name])
    return recipe


def run_context(hydra_cfg: Any, recipe_files: dict[str, Path],
                rerun_of: dict[str, Path]) -> Any:
    """What the run needs from Hydra's globals, as data (finetune.plan.RunContext)."""
    from finetune.plan import RunContext
    from finetune.training import is_main_process

    sweep = hydra_cfg.mode.name == "MULTIRUN"
    return RunContext(run_dir=Path(hydra_cfg.runtime.output_dir),
                      sweep_dir=Path(hydra_cfg.sweep.dir) if sweep else None,
                      recipe=recipe_record(hydra_cfg.runtime.choices.get("recipe"),
                                           recipe_files, rerun_of),
                      overrides=list(hydra_cfg.overrides.task), main_process=is_main_process(),
                      launched=float(os.environ[LAUNCH_ENV]) if LAUNCH_ENV in os.environ
                      else None)


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


def full_error() -> bool:
    """HYDRA_FULL_ERROR=1: show the traceback behind a user error too (for debugging)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report(err: FinetuneError) -> None:
    for line in err.problems:
        print(f"finetune: error: {line}", file=sys.stderr)


def print_help(args: list[str]) -> None:
    """`--help`: the usage, the recipes and groups, and the config these overrides compose.

    Written here rather than left to Hydra, whose help copies the whole config store once for
    each of its 60-odd config groups (over a second); `--hydra-help` is still Hydra's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [a for a in args if a not in ("--help", "-h")]
    with initialize_config_dir(str(schema.CONF_DIR), version_base="1.3", job_name="help"):
        cfg = compose("config", overrides=overrides)
    groups = {"recipe": [schema.BASE_RECIPE, *schema.shipped_recipes()]}
    groups.update({g: sorted(p.stem for p in (schema.CONF_DIR / g).glob("*.yaml"))
                   for g in (*schema.GROUPS, "hydra/launcher")})
    listing = "\n".join(f"  {group}: {', '.join(options)}" for group, options in groups.items())
    details = (
        "arguments besides key=value:\n"
        "  rerun=RUN_DIR         the run's recorded config (a recipe); add resume=RUN_DIR to "
        "continue it\n"
        "  resume=RUN_DIR|CKPT   continue from a checkpoint (resume=auto: this run dir's own)\n"
        "  -m                    a sweep (Hydra multirun): key=a,b,c or sweep=splits|optuna\n"
        "  hydra/launcher=NAME   where a sweep's jobs run (parallel: joblib; slurm, local: "
        "submitit)\n"
        "  --allow-module PREFIX let a recipe name layers of your own package (docs/security.md)"
        "\n  --cfg job             print the composed config and stop\n\n"
        f"recipes and config groups (group=option):\n{listing}\n\n"
        f"config (override any key with key=value; every key is explained in conf/config.yaml):"
        f"\n{OmegaConf.to_yaml(cfg)}\nRuns are written under outputs/<recipe>/<time>-<suffix>/.")
    print(help_text("finetune", details))


def main(argv: list[str] | None = None) -> Any:
    os.environ.setdefault(LAUNCH_ENV, str(time.time()))  # first_step_seconds
    args = sys.argv[1:] if argv is None else argv
    try:
        args = prepare(take_allow_flags(list(args)))
    except FinetuneError as err:
        report(err)
        if full_error():
            raise
        raise SystemExit(2) from None
    if "--help" in args or "-h" in args:
        return print_help(args)
    sys.argv = [sys.argv[0], *args]
    os.environ[RECIPES_OF_RUN_ENV] = json.dumps(
        {"files": {k: str(v) for k, v in RECIPE_FILES.items()},
         "reruns": {k: str(v) for k, v in RERUN_OF.items()}})
    return hydra.main(config_path=str(schema.CONF_DIR), config_name="config",
                      version_base="1.3")(task)()


def cli() -> None:
    """The `finetune` console script."""
    run_entry_point(main)


if __name__ == "__main__":
    run_entry_point(main)
