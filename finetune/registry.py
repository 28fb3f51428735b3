"""The components a recipe may name, and the only place that turns those names into objects.

A recipe is data: it picks from these tables (torch.nn layers, torch.optim optimizers,
torchvision transforms, torchvision.ops blocks), never imports a module by string. The one
way to use your own code is an explicit command-line flag that names its module prefix,
`--allow-module mypkg` (kept in FINETUNE_ALLOW_MODULES for the processes a run starts); a
recipe can then write `type: mypkg.layers.MyBlock`, and nothing outside the prefix resolves.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

from finetune.compose.allowlist import allowed_prefixes, dotted_problem
from finetune.errors import FinetuneError, did_you_mean

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}

# Training augmentations: torchvision.transforms.v2 classes by name.
TRANSFORMS: dict[str, type[v2.Transform]] = {
    name: obj for name, obj in vars(v2).items()
    if isinstance(obj, type) and issubclass(obj, v2.Transform) and name[0].isupper()
}


def optimizer_kwargs(cfg: Any) -> dict[str, Any]:
    """The arguments each optimizer takes from the optim group."""
    kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if isinstance(cfg.lr, int | float):  # (optim.lr=auto before it is found: every group
        kwargs["lr"] = cfg.lr  # carries its own rate)
    if cfg.name == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=bool(cfg.get("nesterov", False)))
    elif cfg.name == "rmsprop":
        kwargs.update(momentum=cfg.momentum, alpha=cfg.get("alpha", 0.99),
                      eps=cfg.get("eps", 1e-8))
    else:
        kwargs.update(betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=cfg.get("eps", 1e-8))
    return kwargs


def make_optimizer(cfg: Any, params: Any) -> torch.optim.Optimizer:
    """`cfg` is the optim group; `params` parameters or named groups."""
    try:
        return OPTIMIZERS[cfg.name](params, **optimizer_kwargs(cfg))
    except ValueError as err:  # e.g. nesterov without momentum
        raise FinetuneError(f"optim: {cfg.name} rejected its settings: {err}") from None


def make_transform(spec: Any, size: int, where: str = "data.augment") -> v2.Transform:
    """`Name` or `{Name: {arg: value}}` -> a v2 transform; `size` is filled in when it takes one."""
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        name, kwargs = next(iter(spec.items()))
        kwargs = dict(kwargs or {})
    else:
        raise FinetuneError(f"{where}: {spec!r} is not a transform; write a name "
                            "(RandomHorizontalFlip) or {Name: {arg: value}}")
    if name not in TRANSFORMS:
        raise FinetuneError(f"{where}: unknown transform {name!r}{did_you_mean(name, TRANSFORMS)}; "
                            "names are torchvision.transforms.v2 classes")
    cls = TRANSFORMS[name]
    if "size" in cls.__init__.__code__.co_varnames and "size" not in kwargs:
        kwargs["size"] = size
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise FinetuneError(f"{where}: {name}({kwargs}) rejected: {err}") from None


# -- layers: torch.nn and torchvision.ops by name; your own modules only when allowed ---------

def _module_types(namespace: Any) -> dict[str, type[nn.Module]]:
    return {name: obj for name, obj in vars(namespace).items() if isinstance(obj, type)
            and issubclass(obj, nn.Module) and not name.startswith("_")
            and obj not in (nn.Module, nn.ModuleList, nn.ModuleDict, nn.ParameterList,
                            nn.ParameterDict)}


LAYERS = _module_types(nn)  # `type: Linear` or `type: torch.nn.Linear`
OPS_LAYERS = _module_types(torchvision.ops)  # `type: torchvision.ops.SqueezeExcitation`


def import_problem(name: Any, where: str) -> str | None:
    """Why the layer name `name` may not be used, without importing anything (None: it may).
    A dotted name must be torch.nn.X or torchvision.ops.X from the tables, or lie under a
    prefix given with --allow-module."""
    if not isinstance(name, str):
        return f"{where}: a layer type is a name, got {name!r}"
    if "." not in name:
        return None if name in LAYERS else (
            f"{where}: unknown layer type {name!r}{did_you_mean(name, LAYERS)}; layers are "
            "torch.nn classes (or torchvision.ops.X)")
    module, _, attr = name.rpartition(".")
    if module in ("torch.nn", "nn"):
        return None if attr in LAYERS else f"{where}: torch.nn has no layer {attr!r}"
    if module == "torchvision.ops":
        return None if attr in OPS_LAYERS else f"{where}: torchvision.ops has no layer {attr!r}"
    return dotted_problem(name, where)


def resolve_layer(name: str, where: str) -> type[nn.Module]:
    """The class a layer name stands for (import_problem must have passed)."""
    problem = import_problem(name, where)
    if problem:
        raise FinetuneError(problem)
    module, _, attr = name.rpartition(".")
    if not module or module in ("torch.nn", "nn"):
        return LAYERS[attr]
    if module == "torchvision.ops":
        return OPS_LAYERS[attr]
    # the allowed prefix, found before anything is imported: `--allow-module mylayers`
    # allows mylayers and mylayers.x, never mylayersevil
    prefix = next((p for p in allowed_prefixes() if module == p or module.startswith(f"{p}.")),
                  None)
    if prefix is None:
        raise FinetuneError(f"{where}: {name!r} is not under a module allowed with "
                            "--allow-module; nothing was imported")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise FinetuneError(f"{where}: cannot import {name!r} ({err})") from None
    defined_in = getattr(obj, "__module__", "") or ""
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)) or not (
            defined_in == prefix or defined_in.startswith(f"{prefix}.")):
        # e.g. mypkg.os.system: reachable through the prefix, defined elsewhere
        raise FinetuneError(f"{where}: {name!r} is not an nn.Module class defined under "
                            f"{prefix} (it is {defined_in or type(obj).__name__}.{attr}); "
                            "only layers of the allowed module are built")
    return obj
