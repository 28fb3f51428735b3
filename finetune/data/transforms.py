"""The eval and training transforms of a run (torchvision.transforms.v2), from its preprocessing
and `data.augment`; the training transform is tried once on a real image."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.errors import FinetuneError
from finetune.models.backbones import Preprocessing
from finetune.registry import make_transform


def eval_transform(prep: Preprocessing, normalize: bool = True) -> v2.Compose:
    """The deterministic transform used for validation and prediction; without `normalize`
    it stops at uint8 (`data.uint8_batches`: the batch is normalized on the device)."""
    return v2.Compose([*resize_crop(prep), *(_to_normalized(prep) if normalize else [])])


# Test-time augmentation (evaluate / predict `tta=`): the views of each image whose logits are
# averaged. `crops`: the four corners and the centre of the resized image (torchvision's
# FiveCrop, as its reference scripts' ten-crop evaluation); `flip`: each view and its mirror.
TTA = ("none", "flip", "crops", "flip+crops")


class _Stacked(v2.Transform):
    """The five crops as one (5, C, H, W) tensor (a class, not a lambda: it pickles)."""

    def forward(self, *inputs: Any) -> Any:
        views = inputs[0] if len(inputs) == 1 else inputs
        return torch.stack(list(views))


def tta_transform(prep: Preprocessing, tta: str) -> v2.Compose:
    """The eval transform for `tta`: with crops, each image becomes its five crops stacked
    (V, C, H, W); otherwise the plain eval transform (a flip is taken on the model's side)."""
    if "crops" not in tta:
        return eval_transform(prep)
    plain = resize_crop(prep)
    return v2.Compose([*plain[:-1], v2.FiveCrop(prep.crop), *_to_normalized(prep), _Stacked()])


def train_transform(prep: Preprocessing, augment: list[Any], normalize: bool = True
                    ) -> v2.Compose:
    """Resize and crop as in eval, then the configured augmentations (on uint8 pixels), then
    normalize (left to the device without `normalize`)."""
    extra = [make_transform(spec, prep.crop) for spec in augment]
    return v2.Compose([*resize_crop(prep), *extra,
                       *(_to_normalized(prep) if normalize else [])])


def batch_normalize(prep: Preprocessing) -> v2.Compose:
    """The transforms' last two steps (to float in [0, 1], then mean and std), for a whole
    uint8 batch on the device: elementwise, so each image gets bit for bit what the per-image
    transform gives it."""
    return v2.Compose(_to_normalized(prep))


def check_augment(transform: v2.Compose, prep: Preprocessing, augment: list[Any],
                  sample: Any) -> None:
    """Run the training transform once on a real training image, step by step, so that an
    augmentation that cannot work (a negative or zero size, arguments that only fail on an
    image) is refused at plan time, naming its entry, rather than in the first batch. The
    random state is left as it was: the run draws what it would have drawn."""
    first = len(resize_crop(prep))
    x = sample
    with torch.random.fork_rng(devices=[]):
        for i, step in enumerate(transform.transforms):
            try:
                x = step(x)
            except Exception as err:  # torchvision raises several types for bad arguments
                where = (f"data.augment[{i - first}] ({augment[i - first]})"
                         if first <= i < first + len(augment) else "data")
                raise FinetuneError(f"{where}: fails on a {prep.crop} px training image: "
                                    f"{' '.join(str(err).split())[:200]}; fix its arguments "
                                    "or remove it") from None


def resize_crop(prep: Preprocessing) -> list[v2.Transform]:
    mode = InterpolationMode(prep.interpolation)
    gray = [v2.Grayscale(1)] if prep.channels == 1 else []
    return [v2.ToImage(), *gray, v2.Resize(prep.resize, interpolation=mode, antialias=True),
            v2.CenterCrop(prep.crop)]


def _to_normalized(prep: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]
