"""`python -m finetune.recipes list|show|copy|validate`: find, read, adapt and check recipes.

    list [--json]                    every recipe found, with what it trains
    show NAME [--resolved]           the recipe file, or the config it composes to
    copy NAME PATH.yaml              a starting point to edit, its run command in the header
    validate NAME_OR_PATH [k=v ...]  every check a run makes before training, all at once

Recipes are found in $FINETUNE_RECIPES (folders separated by os.pathsep) and the shipped
recipes/ folder.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune import config as schema
from finetune.errors import ConfigError, FinetuneError

USAGE = __doc__.split("\n\n")[1]


def description(path: Path) -> str:
    """The recipe's `description:` field, else the first sentence of its header comment."""
    node = OmegaConf.load(path)
    if OmegaConf.is_dict(node) and node.get("description"):
        return str(node.description)
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
    from finetune.inspect import compose_config

    row: dict[str, Any] = {"name": name, "file": str(path), "description": description(path)}
    try:
        cfg, _ = compose_config([f"recipe={path}"])
    except Exception as err:  # a broken user recipe is listed, not fatal
        return {**row, "error": str(err).splitlines()[0]}
    weights = cfg.weights.source + {"torchvision": f":{cfg.weights.name}",
                                    "recipe": f":{cfg.weights.recipe}"}.get(cfg.weights.source, "")
    classes = (cfg.head.num_classes or (len(cfg.data.classes) if cfg.data.classes else None)
               if cfg.head.type != "none" else "none (features)")
    return {**row, "model": cfg.model.name, "weights": weights, "data": cfg.data.name,
            "classes": classes if classes is not None else "from the data"}


def list_recipes(as_json: bool) -> str:
    rows = [summary(name, path) for name, path in schema.shipped_recipes().items()]
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
    _, path = schema.resolve_recipe(spec)
    if not resolved:
        return path.read_text()
    from finetune.inspect import compose_config

    cfg, _ = compose_config([f"recipe={path}", *overrides])
    return OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))


def copy(spec: str, target: str) -> str:
    name, path = schema.resolve_recipe(spec)
    out = Path(target).expanduser()
    if out.exists():
        raise FinetuneError(f"{out} exists already; choose another path or delete it first")
    body = path.read_text().splitlines()
    while body and body[0].startswith("#") and "@package" not in body[0]:
        body.pop(0)  # the old header: its command named the old file
    header = [f"# Started from recipe {name} ({path.name}); edit what differs.",
              f"#   python -m finetune recipe={out}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*header, *body]) + "\n")
    return f"wrote {out}; run it with: python -m finetune recipe={out}"


def weights_reachable(cfg: Any) -> str | None:
    """None when the weights are cached or their URL answers; else what to do."""
    from finetune import backbones
    from finetune.sources import hub_path

    if cfg.weights.source == "torchvision":
        url = backbones.weights_enum(cfg.model.name, cfg.weights.name).url
    elif cfg.weights.source == "url" and cfg.weights.url:
        url = cfg.weights.url
    else:
        return None
    if hub_path(url).is_file():
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5):
            return None
    except OSError as err:
        return (f"weights: {url} is not cached at {hub_path(url)} and cannot be reached "
                f"({getattr(err, 'reason', err)}); download it there before running")


def validate_recipe(spec: str, overrides: list[str]) -> list[str]:
    """Every problem a run would stop on before training (none = the recipe is ready)."""
    from finetune import train
    from finetune.data import build_datamodule
    from finetune.inspect import compose_config
    from finetune.validate import check_model_paths, validate

    try:
        cfg, _ = compose_config([f"recipe={spec}", *overrides])
    except ConfigError as err:
        return err.problems
    problems: list[str] = []
    try:
        validate(cfg)
    except ConfigError as err:
        problems += err.problems
    if any(p.startswith("model.name") for p in problems):
        return problems  # nothing below can be checked without the model
    entry = train.pretrained_entry(cfg) if not problems else None
    reach = weights_reachable(cfg) if not problems else None
    problems += [reach] if reach else []
    prep = train.preprocessing_for(cfg, entry)
    class_names = None
    if cfg.head.type != "none":
        try:
            class_names = build_datamodule(cfg.data, prep, cfg.seed).class_names
            train.check_num_classes(cfg.head.num_classes, class_names)
        except FinetuneError as err:
            problems.append(str(err))
    try:
        check_model_paths(cfg, class_names, entry, prep.crop, prep.channels)
    except ConfigError as err:
        problems += err.problems
    return problems


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
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
            problems = validate_recipe(words[1], words[2:])
            for line in problems:
                print(f"finetune.recipes: error: {line}", file=sys.stderr)
            if problems:
                raise SystemExit(2)
            print(f"{words[1]}: ok — every check a run makes before training passed")
        else:
            print(f"usage:\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
    except FinetuneError as err:
        for line in err.problems:
            print(f"finetune.recipes: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
