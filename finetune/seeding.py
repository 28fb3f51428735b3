"""Random streams that depend only on (seed, epoch[, item]): what makes resume exact."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch, numpy and random for epoch `epoch` of a run seeded with `seed`."""
    value = derive(seed, epoch, 1)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
