"""The architecture a config or a manifest describes: backbone -> head -> surgery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from finetune import backbones, heads, surgery


@dataclass
class Assembled:
    """A model before weights, where its head is, and how surgery moved modules."""

    model: nn.Module
    head_paths: list[str]
    operated: surgery.SurgeryResult


def assemble(model_name: str, build_kwargs: dict[str, Any], num_classes: int | None,
             dropout: float, hidden: list[int], ops: list[dict[str, Any]], input_size: int,
             channels: int = 3) -> Assembled:
    """Build the torchvision architecture, replace its classifier (unless `num_classes` is
    None: no head), then run the surgery ops; head paths follow the surgery's moves."""
    model = backbones.build(model_name, build_kwargs)
    head_paths = (heads.replace_heads(model, num_classes, dropout, hidden)
                  if num_classes is not None else [])
    operated = surgery.apply_surgery(model, ops, input_size, channels)
    return Assembled(operated.model, [operated.map_key(p) for p in head_paths], operated)
