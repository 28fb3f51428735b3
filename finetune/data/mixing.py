"""MixUp and CutMix on training batches (`data.mix`): torchvision.transforms.v2's own, with
the soft targets they make and the cross-entropy that takes them.

They mix pairs of images and their labels across a batch, which a per-image augmentation
cannot do: the module applies them to each training batch, on its device, after the
loader. Their random draws come from torch's generator, which every epoch restarts from
(seed, epoch) (finetune/seeding.py): a resumed run mixes what the uninterrupted run mixed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


class BatchMix:
    """MixUp (mixup_alpha > 0) and/or CutMix (cutmix_alpha > 0; with both, one of the two
    per batch, chosen at random), applied to a batch with probability `prob`; returns the
    batch and its soft targets (N, classes), one-hot where nothing was mixed."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0) -> None:
        mixes: list[v2.Transform] = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixes:
            raise ValueError("BatchMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.num_classes, self.prob = num_classes, prob

    def __call__(self, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob < 1 and float(torch.rand(())) >= self.prob:
            return images, F.one_hot(labels, self.num_classes).to(images.dtype)
        mixed, targets = self.mix(images, labels)
        return mixed, targets.to(images.dtype)

    def describe(self) -> dict[str, Any]:
        names = [type(t).__name__ for t in getattr(self.mix, "transforms", [self.mix])]
        return {"mixes": names, "prob": self.prob}
