"""What happens to the BatchNorm layers inside the frozen region, one policy each, found in
one table (`BN_POLICIES`), chosen by `freeze.bn`.

A policy says two things: whether a frozen BatchNorm's affine weight and bias still train,
and whether its running statistics stay fixed (the layer kept in eval mode through every
train() switch). Freezing applies them (finetune/training/freezing.py); adding one is one entry here
(docs/extending.md). The module imports no torch: the choices are checked at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.extensions import Table


@dataclass(frozen=True)
class BNPolicy:
    name: str
    trains_affine: bool  # weight and bias of a frozen BatchNorm stay trainable
    fixed_stats: bool  # running mean/var do not move (the layer stays in eval mode)
    help: str


BN_POLICIES = Table("freeze.bn", "finetune.bn_policies", "BatchNorm policy")
BN_POLICIES.add(
    BNPolicy("frozen", False, True, "frozen BatchNorm is fully frozen: eval mode, no updates"),
    BNPolicy("train", False, False, "frozen BatchNorm keeps updating its running statistics "
                                    "(train mode); weight and bias stay frozen"),
    BNPolicy("affine", True, True, "frozen BatchNorm trains its weight and bias; its running "
                                   "statistics stay fixed"),)
