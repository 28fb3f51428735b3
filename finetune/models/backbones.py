"""Model name -> torchvision model, its weights enum and the preprocessing the weights expect."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from finetune.errors import FinetuneError, did_you_mean

# Keys of old torchvision checkpoints that its builders rename before loading; we load the
# state dict ourselves (to report on it), so we rename the same way. (densenet: 'norm.1'
# became 'norm1' when dots were banned from module names.)
KEY_FIXES: dict[str, list[tuple[str, str]]] = {
    "densenet": [(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|"
                  r"running_mean|running_var))$", r"\1\2")],
}


def list_backbones() -> list[str]:
    """Every classification model torchvision registers."""
    return torchvision.models.list_models(module=torchvision.models)


def check_name(name: str) -> None:
    names = list_backbones()
    if name not in names:
        raise FinetuneError(f"model.name={name!r} is not a torchvision classification model"
                            f"{did_you_mean(name, names)}; "
                            "see torchvision.models.list_models(module=torchvision.models)")


def weights_enum(model_name: str, weights_name: str) -> WeightsEnum:
    """The torchvision weights entry, e.g. ('resnet50', 'IMAGENET1K_V2'); DEFAULT works too
    (a detector's or a segmentation model's too: their plans ask for those by name)."""
    if model_name not in (torchvision.models.list_models(module=torchvision.models.detection)
                          + torchvision.models.list_models(
                              module=torchvision.models.segmentation)):
        check_name(model_name)
    enum_cls = torchvision.models.get_model_weights(model_name)
    members = [m.name for m in enum_cls]
    if weights_name == "DEFAULT":
        return enum_cls.DEFAULT
    if weights_name not in members:
        raise FinetuneError(f"weights.name={weights_name!r} is not a weights entry of "
                            f"{model_name}{did_you_mean(weights_name, members, n=2, cutoff=0.4)}"
                            f"; choose one of: {', '.join(members)}, DEFAULT")
    return enum_cls[weights_name]


def pretrained_kwargs(model_name: str, weights: WeightsEnum) -> dict[str, Any]:
    """Builder arguments torchvision sets when it loads these weights (so the shapes match)."""
    kwargs: dict[str, Any] = {}
    if model_name in ("inception_v3", "googlenet"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif model_name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif model_name.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def key_fixes(model_name: str) -> list[tuple[str, str]]:
    return [fix for family, fixes in KEY_FIXES.items() if model_name.startswith(family)
            for fix in fixes]


def build(model_name: str, kwargs: dict[str, Any], weights: WeightsEnum | None = None) -> nn.Module:
    """The architecture with random initialization; weights are loaded by finetune.weights.

    Args:
        weights: when given, the builder arguments these weights imply are set first
            (user kwargs still win).
    """
    check_name(model_name)
    merged = {**(pretrained_kwargs(model_name, weights) if weights is not None else {}), **kwargs}
    try:
        return torchvision.models.get_model(model_name, weights=None, **merged)
    except (TypeError, ValueError) as err:
        raise FinetuneError(f"model.kwargs={kwargs} rejected by torchvision's {model_name} "
                            f"builder: {err}") from None


@dataclass
class Preprocessing:
    """The deterministic eval transform: resize the short side, center-crop, normalize."""

    resize: int
    crop: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    channels: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def steps(self) -> list[str]:
        """The transform in words, as an exported model's JSON states it for whoever feeds
        the model without finetune."""
        gray = "convert to 1 channel (grayscale)" if self.channels == 1 else \
            "convert to RGB"
        return [gray,
                f"resize so that the shorter side is {self.resize} px ({self.interpolation}; "
                "the aspect ratio is kept)",
                f"center-crop {self.crop} x {self.crop} px",
                "scale the pixels to [0, 1]",
                f"normalize each channel: (x - mean) / std with mean {self.mean} and std "
                f"{self.std}"]


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def preprocessing(weights: WeightsEnum | dict[str, Any] | None, image_size: int | None,
                  mean: list[float] | None = None, std: list[float] | None = None,
                  channels: int = 3, interpolation: str | None = None,
                  crop_pct: float | None = None) -> Preprocessing:
    """The weights' own eval preprocessing, scaled to `image_size` and overridden where given.

    `weights` is a torchvision weights entry or a timm pretrained config (a dict: its
    input_size, crop_pct, interpolation, mean and std, through timm.data.resolve_data_config).
    With `channels=1` the weights' per-channel statistics are averaged to one.
    """
    if weights is None:
        size = image_size or 224
        prep = Preprocessing(size, size, list(IMAGENET_MEAN), list(IMAGENET_STD))
    elif isinstance(weights, dict):
        prep = timm_preprocessing(weights, image_size)
    else:
        preset = weights.transforms()
        crop, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
        size = image_size or crop
        prep = Preprocessing(resize=round(size * resize / crop), crop=size,
                             mean=list(preset.mean), std=list(preset.std),
                             interpolation=preset.interpolation.value)
    if crop_pct is not None:
        prep.resize = math.floor(prep.crop / crop_pct)
    if interpolation is not None:
        prep.interpolation = interpolation
    if channels == 1 and len(prep.mean) == 3:
        prep.mean, prep.std = [sum(prep.mean) / 3], [sum(prep.std) / 3]
    prep.channels = channels
    prep.mean, prep.std = list(mean or prep.mean), list(std or prep.std)
    return prep


# timm's interpolation names -> torchvision's InterpolationMode values ("random" trains
# with a random one: evaluation uses bilinear, as timm's eval transform does)
_TIMM_INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest",
                       "lanczos": "lanczos", "box": "box", "hamming": "hamming",
                       "random": "bilinear"}


def timm_preprocessing(pretrained_cfg: dict[str, Any], image_size: int | None) -> Preprocessing:
    """The eval preprocessing of a timm pretrained config, as timm resolves it
    (resolve_data_config: input size, crop_pct, interpolation, mean, std), scaled to
    `image_size` with the same crop_pct. The config may come from a received folder's
    config.json: its values are checked."""
    # lazy: an optional extra (finetune[timm])
    from timm.data import resolve_data_config

    where = f"the pretrained config of {pretrained_cfg.get('architecture') or 'these weights'}"
    try:
        data = resolve_data_config({}, pretrained_cfg=dict(pretrained_cfg))
        size = [int(v) for v in data["input_size"]]
        crop_pct = float(data.get("crop_pct") or 0.875)
        mean, std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
        mode = _TIMM_INTERPOLATION[str(data.get("interpolation") or "bilinear")]
    except (KeyError, TypeError, ValueError) as err:
        raise FinetuneError(f"{where} cannot be used for preprocessing ({err}); set "
                            "data.image_size, data.mean and data.std yourself") from None
    if len(size) != 3 or min(size) < 1 or not 0 < crop_pct <= 1 or not std or \
            min(std) <= 0 or len(mean) != len(std):
        raise FinetuneError(f"{where} has an input_size, crop_pct, mean or std that cannot "
                            f"be right ({size}, {crop_pct}, {mean}, {std})")
    crop = image_size or size[-1]
    return Preprocessing(resize=math.floor(crop / crop_pct), crop=crop, mean=mean, std=std,
                         interpolation=mode)
