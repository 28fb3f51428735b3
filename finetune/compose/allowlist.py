"""What a recipe may import by name: nothing, unless the command line says so.

Recipes are data. They name components from the registry (finetune/registry.py); the only
dotted names they may use are torch.nn.X and torchvision.ops.X (looked up in tables, never
imported by string), and names under a module prefix that the person running the command
allowed with `--allow-module PREFIX`. `_target_` (Hydra's import-by-string) is never read
from a recipe. These checks import nothing, so they run at compose time, before torch.
"""

from __future__ import annotations

import os
from typing import Any

from finetune.errors import FinetuneError

ALLOW_ENV = "FINETUNE_ALLOW_MODULES"  # how the flag reaches the processes a run starts
ALLOW_FLAG = "--allow-module"
BUILTIN_NAMESPACES = ("torch.nn", "nn", "torchvision.ops")


def take_allow_flags(argv: list[str]) -> list[str]:
    """Remove `--allow-module PREFIX` (repeatable, or `--allow-module=PREFIX`) from argv and
    allow those prefixes for this process and the processes it starts."""
    rest, allowed, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == ALLOW_FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-") or "=" in argv[i + 1]:
                raise FinetuneError(f"{ALLOW_FLAG} needs a module prefix, e.g. {ALLOW_FLAG} "
                                    "mypkg")
            allowed.append(argv[i + 1])
            i += 2
            continue
        if token.startswith(f"{ALLOW_FLAG}="):
            allowed.append(token.partition("=")[2])
        else:
            rest.append(token)
        i += 1
    if allowed:
        known = [p for p in os.environ.get(ALLOW_ENV, "").split(",") if p]
        os.environ[ALLOW_ENV] = ",".join(dict.fromkeys([*known, *allowed]))
    return rest


def allowed_prefixes() -> list[str]:
    return [p.strip().rstrip(".") for p in os.environ.get(ALLOW_ENV, "").split(",")
            if p.strip()]


def dotted_problem(name: str, where: str) -> str | None:
    """Why the dotted layer name may not be used (None: it may, or the registry decides)."""
    module = name.rpartition(".")[0]
    if module in BUILTIN_NAMESPACES:
        return None  # looked up in the registry's tables when the layer is built
    if any(name.startswith(f"{prefix}.") for prefix in allowed_prefixes()):
        return None
    return (f"{where}: {name!r} would import code by name, which a recipe may not do; layers "
            "are torch.nn and torchvision.ops classes. To use your own module, run with "
            f"{ALLOW_FLAG} {name.split('.')[0]} on the command line")


def import_problems(node: Any, where: str, path: str = "") -> list[str]:
    """Every import-by-string in a recipe or override value: `_target_` anywhere, and dotted
    layer `type:` names outside the allowlist."""
    problems: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                problems.append(f"{where}: {here}={value!r}: _target_ is not read from recipes "
                                "(they name components from the registry, e.g. {type: Linear});"
                                f" for your own layers write type: and run with {ALLOW_FLAG}")
            elif key == "type" and isinstance(value, str) and "." in value:
                problem = dotted_problem(value, f"{where}: {here}")
                problems += [problem] if problem else []
            else:
                problems += import_problems(value, where, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems += import_problems(value, where, f"{path}[{i}]")
    return problems
