"""A layer of "your own package", for tests that use `--allow-module tests.user_layers`."""

from __future__ import annotations

import torch
from torch import nn


class NanInEval(nn.Module):
    """The identity while training, NaN in eval mode: a model whose training loss stays
    finite while its validation metrics are not (as overflowing BatchNorm statistics or a
    16-bit overflow in eval make them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else x * float("nan")
