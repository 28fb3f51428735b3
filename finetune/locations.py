"""Where finetune's files are: its own cache ($FINETUNE_HOME), the shipped conf/ and recipes/,
and a recipe found by name or path. Torch-free; every stage reads these, none writes them."""

from __future__ import annotations

import os
import re
from pathlib import Path

from finetune.errors import ConfigError, did_you_mean

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped_dir(name: str) -> Path:
    """conf/ or recipes/: inside the package when installed from a wheel, else the repo top."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _shipped_dir("conf")


RECIPES_DIR = _shipped_dir("recipes")


RECIPES_ENV = "FINETUNE_RECIPES"


HOME_ENV = "FINETUNE_HOME"
# The split points a sweep tries, set by its callback at its start for the jobs' feature
# caches (an env var: launchers' worker processes inherit it).
SPLITS_ENV = "FINETUNE_SWEEP_SPLITS"


def finetune_home() -> Path:
    """finetune's own cache: $FINETUNE_HOME, else $XDG_CACHE_HOME/finetune, else
    ~/.cache/finetune. Recipe sources, URL downloads and trusted_weights.txt live here,
    where no recipe or received run dir can plant a file."""
    home = os.environ.get(HOME_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "finetune")
    return Path(home).expanduser()


def cache_dir(name: str) -> Path:
    """A folder of finetune's own cache (finetune_home), made private to this user."""
    folder = finetune_home() / name
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: the folders in $FINETUNE_RECIPES (separated by
    os.pathsep, first wins), then the shipped recipes/."""
    extra = [Path(p).expanduser() for p in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if p]
    return [*extra, RECIPES_DIR]


def shipped_recipes() -> dict[str, Path]:
    """Name -> file for every recipe that `recipe=NAME` finds (user folders first)."""
    found: dict[str, Path] = {}
    for folder in reversed(recipe_dirs()):
        found.update({p.stem: p for p in sorted(folder.glob("*.yaml"))})
    return dict(sorted(found.items()))


# A recipe's name becomes part of its run dir's path: letters, digits, '_', '-', '.', and it
# may not start with a dot (a file `...yaml` would be named `..`).
RECIPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def resolve_recipe(value: str, cwd: Path | None = None) -> tuple[str, Path]:
    """Map `recipe=VALUE` (a shipped name or a path to a YAML file) to (name, file).

    Raises:
        ConfigError: when VALUE is neither, naming the closest shipped recipes.
    """
    shipped = shipped_recipes()
    looks_like_path = value.endswith((".yaml", ".yml")) or "/" in value or "\\" in value
    if not looks_like_path and value in shipped:
        return value, shipped[value]
    if looks_like_path:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (cwd or Path.cwd()) / path
        if path.is_file():
            if not RECIPE_NAME.fullmatch(path.stem):
                raise ConfigError([f"recipe={value}: a recipe's file name may hold only letters, "
                                   "digits, '_', '-', '+' and '.', and not start with a dot (it "
                                   "names the run dir); rename the file"])
            return path.stem, path.resolve()
        raise ConfigError(
            [f"recipe={value}: no such file ({path}); check the path, or use a shipped name: "
             f"{', '.join(shipped)}"]
        )
    raise ConfigError([f"recipe={value}: no such recipe{did_you_mean(value, shipped)}; "
                       f"recipes are found in {', '.join(map(str, recipe_dirs()))} (add folders "
                       f"with ${RECIPES_ENV}), or pass a path to a .yaml file"])


def inside(path: Path, root: Path) -> bool:
    """Whether `path` resolves (links followed) inside `root`: what a received data folder
    may name (its own files only)."""
    base, resolved = Path(root).resolve(), Path(path).resolve()
    return resolved == base or base in resolved.parents
