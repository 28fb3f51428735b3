"""Pure operations on an nn.Module tree addressed by dotted path."""

from __future__ import annotations

import difflib

from torch import nn

from finetune.errors import FinetuneError


def module_paths(model: nn.Module) -> list[str]:
    """Every submodule's dotted path, in registration order (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, path: str, key: str = "path") -> nn.Module:
    """The submodule at `path`; an unknown path fails naming the closest ones.

    Args:
        key: the config key the path came from, for the error message.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        close = difflib.get_close_matches(path, module_paths(model), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        children = ", ".join(name for name, _ in model.named_children())
        raise FinetuneError(f"{key}={path!r} matches no module of the model{hint}; "
                            f"its top-level modules are: {children}") from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path`, replacing what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)
