"""`finetune recipes list|show|copy|validate`: find, read, adapt and check recipes.

    list [--json]                    every recipe found, with what it trains
    show NAME [--resolved]           the recipe file, or the config it composes to
    copy NAME PATH.yaml              a starting point to edit, its run command in the header
    validate NAME_OR_PATH [k=v ...]  every check a run makes before training, all at once

Recipes are found in $FINETUNE_RECIPES (folders separated by os.pathsep) and the shipped
recipes/ folder.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from finetune import locations
from finetune.cli import help_text, usage, wants_help
from finetune.compose import safe_files
from finetune.compose.prepare import compose_config, compose_with_hydra
from finetune.errors import FinetuneError, run_entry_point
from finetune.rundir import artifacts
from finetune.weights.sources import source_of

USAGE = __doc__.split("\n\n")[1]


def description(path: Path) -> str:
    """The recipe's `description:` field, else the first sentence of its header comment."""
    try:
        node = safe_files.load_yaml(path, "recipe")
    except FinetuneError as err:
        return f"(unreadable: {err})"
    if isinstance(node, dict) and isinstance(node.get("description"), str):
        return node["description"]
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith(("@package", "python -m")):
            header.append(text)
    sentence = " ".join(header).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 100 else sentence[:97] + "..."


def summary(name: str, path: Path) -> dict[str, Any]:
    """One row of `list`: what the recipe trains, from the config it composes to."""

    row: dict[str, Any] = {"name": name, "file": str(path), "description": description(path)}
    try:
        cfg, _ = compose_config([f"recipe={path}"])
    except Exception as err:  # a broken user recipe is listed, not fatal
        return {**row, "error": str(err).splitlines()[0]}

    weights = source_of(cfg).label(cfg)
    classes = (cfg.head.num_classes or (len(cfg.data.classes) if cfg.data.classes else None)
               if cfg.head.type != "none" else "none (features)")
    return {**row, "model": cfg.model.name, "weights": weights, "data": cfg.data.name,
            "classes": classes if classes is not None else "from the data"}


def list_recipes(as_json: bool) -> str:
    rows = [summary(name, path) for name, path in locations.shipped_recipes().items()]
    if as_json:
        return json.dumps(rows, indent=2)
    lines = [f"{'recipe':<22} {'model':<16} {'weights':<28} {'data':<12} {'classes':<16} what"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<22} (does not compose: {r['error']})")
            continue
        lines.append(f"{r['name']:<22} {r['model']:<16} {r['weights']:<28} {r['data']:<12} "
                     f"{r['classes']!s:<16} {r['description']}")
    return "\n".join(lines)


def show(spec: str, resolved: bool, overrides: list[str]) -> str:
    """The recipe file, or (`--resolved`) the config a run of it records."""
    _, path = locations.resolve_recipe(spec)
    if not resolved:
        return path.read_text()

    cfg, _ = compose_config([f"recipe={path}", *overrides])
    return OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))


def copy(spec: str, target: str) -> str:
    name, path = locations.resolve_recipe(spec)
    out = Path(target).expanduser()
    if out.exists():
        raise FinetuneError(f"{out} exists already; choose another path or delete it first")
    body = path.read_text().splitlines()
    while body and body[0].startswith("#") and "@package" not in body[0]:
        body.pop(0)  # the old header: its command named the old file
    header = [f"# Started from recipe {name} ({path.name}); edit what differs.",
              f"#   python -m finetune recipe={out}"]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FinetuneError(f"cannot create the folder {out.parent} ({err.strerror or err}); "
                            "choose a path you can write to") from None
    try:
        artifacts.write_bytes(out, ("\n".join([*header, *body]) + "\n").encode())
    except artifacts.DiskFull:
        raise
    except OSError as err:
        raise FinetuneError(f"cannot write {out} ({err.strerror or err}); choose a path you "
                            "can write to") from None
    return f"wrote {out}; run it with: python -m finetune recipe={out}"


def weights_reachable(cfg: Any) -> str | None:
    """None when the weights are at hand (cached, or their URL answers); else what to do."""

    return source_of(cfg).unreachable(cfg)


def machine_effects(cfg: Any, hydra: Any) -> list[str]:
    """What a run of `cfg` does to this machine beyond its run dir: downloads, a source recipe
    trained first, files read from outside, jobs submitted. (A recipe cannot make a run
    write outside its run dir: the gate refuses the keys that would.)"""

    run_dir = str(OmegaConf.to_container(hydra.run, resolve=False)["dir"])
    run_dir = re.sub(r"\$\{now:[^}]*\}", "<time>", run_dir.replace(
        "${hydra.runtime.choices.recipe}", str(hydra.runtime.choices.recipe)))
    run_dir = run_dir.replace("${run_suffix:}", "<suffix>")
    effects = [f"writes its run dir at {run_dir} (relative to the working directory), and "
               "nothing else outside finetune's caches", *source_of(cfg).effects(cfg)]
    if cfg.data.root:
        effects.append(f"reads images from {cfg.data.root}")
    if cfg.resume and cfg.resume != "auto":
        effects.append(f"reads the checkpoint {cfg.resume}")
    launcher = hydra.runtime.choices.get("hydra/launcher")
    if launcher in ("slurm", "submitit_slurm"):
        effects.append("in a sweep (-m), submits each job to SLURM with sbatch")
    elif launcher in ("parallel", "joblib", "local", "submitit_local"):
        effects.append(f"in a sweep (-m), runs jobs in parallel processes ({launcher})")
    return effects


# "<where>: optim.name='rmsprob' is not one of sgd, ..." (config.check_value)
CHOICE_PROBLEM = re.compile(r": ([A-Za-z_][\w.]*)=.* is not one of ")


def validate_recipe(spec: str, overrides: list[str]) -> tuple[list[str], list[str]]:
    """(every problem a run would stop on before training, what the run would do to this
    machine). No problems: the recipe is ready. The recipe passes the same gate a run uses."""
    # lazy: keeps torch off a torch-free path
    from finetune.training.plan import plan_run

    args = [f"recipe={spec}", *overrides]
    first: list[str] = []
    try:
        full = compose_with_hydra(args)
    except FinetuneError as err:
        # Values outside their choices stop composition; to check the model as well, look
        # again with those keys at their defaults (only when that is all that was wrong).
        first = err.problems
        keys = frozenset(m.group(1) for p in first if (m := CHOICE_PROBLEM.search(p)))
        if len(keys) < len(first) or not keys:
            return first, []
        try:
            full = compose_with_hydra(args, drop=keys)
        except FinetuneError:
            return first, []
    hydra = full.hydra
    cfg = full.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    problems = first + plan_run(cfg, load=False).problems
    if not problems:
        reach = weights_reachable(cfg)
        problems += [reach] if reach else []
    problems = list(dict.fromkeys(problems))  # two checks may find the same thing
    return problems, machine_effects(cfg, hydra) if not problems else []


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print(help_text("recipes", f"commands:\n{USAGE}"))
        return
    flags = {a for a in args if a.startswith("--")}
    words = [a for a in args if not a.startswith("--")]
    command = words[0] if words else ""
    try:
        if command == "list" and len(words) == 1:
            print(list_recipes("--json" in flags))
        elif command == "show" and len(words) >= 2:
            print(show(words[1], "--resolved" in flags, words[2:]), end="")
        elif command == "copy" and len(words) == 3:
            print(copy(words[1], words[2]))
        elif command == "validate" and len(words) >= 2:
            problems, effects = validate_recipe(words[1], words[2:])
            for line in problems:
                print(f"finetune recipes: error: {line}", file=sys.stderr)
            if problems:
                raise SystemExit(2)
            print(f"{words[1]}: ok — every check a run makes before training passed\n"
                  "what a run does on this machine:\n" + "\n".join(f"  - {e}" for e in effects))
        else:
            what = f"unknown command {command!r}" if command else "no command given"
            print(f"finetune recipes: error: {what}; {usage('recipes')}\n"
                  "(finetune recipes --help shows each command)", file=sys.stderr)
            raise SystemExit(2)
    except FinetuneError as err:
        for line in err.problems:
            print(f"finetune recipes: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run_entry_point(main)
