"""The components a recipe may name, and the only place that turns those names into objects.

A recipe is data: it can pick from these tables, never import a module by string.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

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
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
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
