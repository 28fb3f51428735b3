"""One grammar for naming parts of a model: freeze, unfreeze phases and optimizer groups.

A selector is
  - a module path: `layer3`, `layer3.1`, `features.24` (the module and everything inside it);
  - a glob over module paths: `layer[12]*`, `*.bn*` (every module whose path matches);
  - a top-level child index: `6`, `-1` (negative counts from the end);
  - or a list of these (their union).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

from finetune.errors import FinetuneError
from finetune.models.surgery import get_module

GLOB_CHARS = set("*?[")


def is_glob(text: str) -> bool:
    return bool(GLOB_CHARS & set(text))


def as_list(selector: Any) -> list[Any]:
    """A selector as a list of single selectors (str / int); None is the empty list."""
    if selector is None:
        return []
    if isinstance(selector, (str, int)):
        return [selector]
    return list(selector)


def child_at(model: nn.Module, index: int, key: str) -> str:
    """The path of top-level child `index` (negative counts from the end)."""
    children = [name for name, _ in model.named_children()]
    if not -len(children) <= index < len(children):
        raise FinetuneError(f"{key}={index}: the model has {len(children)} top-level children "
                            f"(0..{len(children) - 1}): {', '.join(children)}")
    return children[index]


def select_modules(model: nn.Module, selector: Any, key: str) -> list[str]:
    """The module paths a selector names, in module order, without duplicates.

    Raises:
        FinetuneError: a path, glob or index that matches nothing, naming the closest paths.
    """
    names = [name for name, _ in model.named_modules() if name]
    picked: set[str] = set()
    for item in as_list(selector):
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise FinetuneError(f"{key}: {item!r} is not a selector; write a module path "
                                "(layer3), a glob (layer[12]*) or a top-level index (6)")
        if isinstance(item, int):
            picked.add(child_at(model, item, key))
        elif is_glob(item):
            matches = [n for n in names if fnmatch.fnmatchcase(n, item)]
            if not matches:
                tops = [n for n, _ in model.named_children()]
                raise FinetuneError(f"{key}: {item!r} matches no module; top-level modules are "
                                    f"{', '.join(tops)} (paths look like {names[-1]!r})")
            picked.update(matches)
        else:
            get_module(model, item, key=key)  # raises with the nearest real paths
            picked.add(item)
    return [n for n in names if n in picked]


def inside(name: str, roots: Iterable[str]) -> bool:
    """Whether module `name` is one of `roots` or inside one of them."""
    return any(name == r or name.startswith(f"{r}.") for r in roots)


def owner(param_name: str) -> str:
    """The module path holding a parameter: `layer1.0.conv1.weight` -> `layer1.0.conv1`."""
    return param_name.rpartition(".")[0]


def params_under(model: nn.Module, modules: Iterable[str]) -> list[str]:
    """Parameter names held by these modules or modules inside them, in model order."""
    roots = list(modules)
    return [n for n, _ in model.named_parameters() if inside(owner(n), roots)]


def describe(selector: Any) -> str:
    """A selector as short text, for group names and messages."""
    return "+".join(str(s) for s in as_list(selector))
