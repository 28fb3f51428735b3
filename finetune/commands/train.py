"""`finetune [train] recipe=NAME_OR_PATH [key=value ...]`: train from a recipe.

The steps, each logged: compose (Hydra) -> validate -> build -> plan -> fit -> save; see
finetune/training/run.py. Only the task imports torch, so `--help` and `--cfg job` stay fast.
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
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune import locations
from finetune.cli import help_text
from finetune.compose import schema
from finetune.compose.allowlist import take_allow_flags
from finetune.compose.precheck import config_problems
from finetune.compose.prepare import (
    RECIPE_FILES,
    RECIPES_OF_RUN_ENV,
    RERUN_OF,
    inherited_recipes,
    prepare,
    recipe_record,
    sweeper_problem,
)
from finetune.errors import ConfigError, FinetuneError, print_problems
from finetune.rundir.artifacts import ERROR_FILE, remove_if_unused

log = logging.getLogger("finetune")


LAUNCH_ENV = "FINETUNE_LAUNCHED"  # wall-clock time the command started: first_step_seconds


def task(cfg: DictConfig) -> float:
    """One training job. Returns the monitored metric so Hydra sweepers can optimize it."""

    if not RECIPE_FILES and not RERUN_OF:  # a launcher's worker process (joblib, submitit)
        inherited = inherited_recipes()
        RECIPE_FILES.update({k: Path(v) for k, v in inherited.get("files", {}).items()})
        RERUN_OF.update({k: Path(v) for k, v in inherited.get("reruns", {}).items()})
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode.name == "MULTIRUN"
    problem = sweeper_problem(hydra_cfg, cfg.metric) if sweep else None
    if problem:  # wrong for every job: stop the sweep before the first one trains
        print_problems(ConfigError([problem]))
        raise SystemExit(2)
    if not sweep:  # what needs no torch is checked before torch is imported (a second, not
        problems = config_problems(cfg)  # most of a minute on a busy machine)
        if problems:
            print_problems(ConfigError(problems))
            remove_if_unused(Path(hydra_cfg.runtime.output_dir))
            if full_error():
                raise ConfigError(problems)
            raise SystemExit(2)
    # lazy: keeps torch off a torch-free path
    from finetune.training.run import run

    try:
        return run(cfg, run_context(hydra_cfg, RECIPE_FILES, RERUN_OF))
    except FinetuneError as err:
        print_problems(err)
        if sweep:
            return math.nan  # the failed job is recorded in its dir; the sweep goes on
        if full_error():
            raise
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # outside fit (in fit, Lightning exits 1 itself)
        # lazy: keeps torch off a torch-free path
        from finetune.training.callbacks import stop_name

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


def run_context(hydra_cfg: Any, recipe_files: dict[str, Path],
                rerun_of: dict[str, Path]) -> Any:
    """What the run needs from Hydra's globals, as data (finetune.plan.RunContext)."""
    # lazy: keeps torch off a torch-free path
    from finetune.training.plan import RunContext

    # lazy: keeps torch off a torch-free path
    from finetune.training.run import is_main_process

    sweep = hydra_cfg.mode.name == "MULTIRUN"
    return RunContext(run_dir=Path(hydra_cfg.runtime.output_dir),
                      sweep_dir=Path(hydra_cfg.sweep.dir) if sweep else None,
                      recipe=recipe_record(hydra_cfg.runtime.choices.get("recipe"),
                                           recipe_files, rerun_of),
                      overrides=list(hydra_cfg.overrides.task), main_process=is_main_process(),
                      launched=float(os.environ[LAUNCH_ENV]) if LAUNCH_ENV in os.environ
                      else None)


def full_error() -> bool:
    """HYDRA_FULL_ERROR=1: show the traceback behind a user error too (for debugging)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def print_help(args: list[str]) -> None:
    """`--help`: the usage, the recipes and groups, and the config these overrides compose.

    Written here rather than left to Hydra, whose help copies the whole config store once for
    each of its 60-odd config groups (over a second); `--hydra-help` is still Hydra's."""

    overrides = [a for a in args if a not in ("--help", "-h")]
    with initialize_config_dir(str(locations.CONF_DIR), version_base="1.3", job_name="help"):
        cfg = compose("config", overrides=overrides)
    groups = {"recipe": [schema.BASE_RECIPE, *locations.shipped_recipes()]}
    groups.update({g: sorted(p.stem for p in (locations.CONF_DIR / g).glob("*.yaml"))
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
    print(help_text("train", details))


def main(argv: list[str] | None = None) -> Any:
    os.environ.setdefault(LAUNCH_ENV, str(time.time()))  # first_step_seconds
    args = sys.argv[1:] if argv is None else argv
    try:
        args = prepare(take_allow_flags(list(args)))
    except FinetuneError as err:
        print_problems(err)
        if full_error():
            raise
        raise SystemExit(2) from None
    if "--help" in args or "-h" in args:
        return print_help(args)
    sys.argv = [sys.argv[0], *args]
    os.environ[RECIPES_OF_RUN_ENV] = json.dumps(
        {"files": {k: str(v) for k, v in RECIPE_FILES.items()},
         "reruns": {k: str(v) for k, v in RERUN_OF.items()}})
    return hydra.main(config_path=str(locations.CONF_DIR), config_name="config",
                      version_base="1.3")(task)()

