"""The architecture a config or a manifest describes: backbone -> head -> surgery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from finetune.errors import ConfigError, FinetuneError
from finetune.models import surgery
from finetune.models.sources import BUILDER_LOADS, MODEL_SOURCES, builder_loads_problem


@dataclass
class Assembled:
    """A model before weights, where its head is, and how surgery moved modules."""

    model: nn.Module
    head_paths: list[str]
    operated: surgery.SurgeryResult


def assemble(model_name: str, build_kwargs: dict[str, Any], num_classes: int | None,
             dropout: float, hidden: list[int], ops: list[Any], input_size: int,
             channels: int = 3, problems: list[str] | None = None,
             source: str = "torchvision") -> Assembled | None:
    """Build the architecture (`source`: a model source of finetune.model_sources), replace
    its classifier (unless `num_classes` is
    None: no head), then run the surgery ops; head paths follow the surgery's moves.

    Without `problems`, any problem raises (all of them, ConfigError). With it, problems are
    appended and the model is assembled as far as it goes, so later checks (freeze
    selectors, weights.require) still run on it: usable only if none were added. None when
    the backbone itself could not be built.
    """
    found: list[str] = [] if problems is None else problems
    start = len(found)
    model, head_paths = None, []
    try:
        maker = MODEL_SOURCES[source]
        loads = sorted(set(build_kwargs) & set(BUILDER_LOADS))
        if loads:  # weights come from weights.source: checked and reported
            raise FinetuneError(builder_loads_problem(loads[0], "model.kwargs"))
        model = maker.build(model_name, build_kwargs)
        if num_classes is not None:
            head_paths = maker.replace_heads(model, num_classes, dropout, hidden)
    except FinetuneError as err:
        found.extend(err.problems)
    operated = (surgery.apply_surgery(model, ops, input_size, channels, found)
                if model is not None else None)
    if problems is None and len(found) > start:
        raise ConfigError(found)
    if operated is None:
        return None
    return Assembled(operated.model, [operated.map_key(p) for p in head_paths], operated)
