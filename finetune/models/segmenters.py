"""Segmentation models for the data's classes (one output map per class, at the input's
size): torchvision's DeepLabv3, FCN and LR-ASPP by name, or a classifier's feature map under
a DeepLabv3 or FCN head — the classifier cut after one of its top-level modules with
torchvision's IntermediateLayerGetter, as torchvision's own segmentation builders cut their
ResNets, so the encoder keeps the classifier's module names (`backbone.layer4`) and its
tensors. Both kinds return torchvision's {"out": logits[, "aux": logits]}. Nothing is
downloaded: the weights are finetune's to load.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import segmentation
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

HEADS = {"deeplabv3": (segmentation.DeepLabV3, DeepLabHead),
         "fcn": (segmentation.FCN, lambda width, classes: FCNHead(width, classes))}
# The layers of torchvision's segmentation models sized by the classes (a new class list
# replaces them; a pretrained tensor there is of other classes)
CLASS_LAYERS = ("classifier.4", "aux_classifier.4", "classifier.low_classifier",
                "classifier.high_classifier")
POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)


class SegmenterProblem(ValueError):
    """What cannot become a segmentation model, in one sentence."""


def segmenter_names() -> list[str]:
    """torchvision's segmentation models (deeplabv3_*, fcn_*, lraspp_*)."""
    return torchvision.models.list_models(module=segmentation)


def build_segmenter(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """torchvision's segmentation model `name` for `num_classes` classes, random weights;
    `kwargs` go to its builder (aux_loss...)."""
    return torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                        num_classes=num_classes, **kwargs)


def class_layers(model: nn.Module) -> list[str]:
    """The paths of a segmentation model's layers sized by its classes."""
    names = {n for n, _ in model.named_modules()}
    return [w for w in CLASS_LAYERS if w in names] or (["classifier"] if "classifier" in names
                                                       else [])


def _outputs(classifier: nn.Module, size: int, channels: int) -> list[tuple[str, Any]]:
    """(name, output) of each top-level module of `classifier` on one `size` px image."""
    found: list[tuple[str, Any]] = []
    hooks = [module.register_forward_hook(
        lambda _m, _i, out, name=name: found.append((name, out)))
        for name, module in classifier.named_children()]
    was = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            classifier(torch.zeros(1, channels, size, size))
    finally:
        classifier.train(was)
        for hook in hooks:
            hook.remove()
    return found


def encoder_node(classifier: nn.Module, node: str, size: int, channels: int) -> tuple[str, int]:
    """(the top-level module the head reads, its channels): `node`, or for auto the last one
    whose output is still a feature map before the classifier pools it."""
    children = dict(classifier.named_children())
    outputs = _outputs(classifier, size, channels)
    maps, pooled, tokens = {}, False, None
    for name, out in outputs:
        if isinstance(children.get(name), POOLS):
            pooled = True  # (a map, but the head reads what comes before it is pooled)
            continue
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            tokens = None if pooled else name  # vectors from a pool, or tokens (a ViT)
            break
        maps[name] = int(out.shape[1])
    if node == "auto":
        if tokens is not None and maps:
            raise SegmenterProblem(f"it turns its feature map into tokens at {tokens!r} (a "
                                   "transformer): its maps are only the patch embedding; "
                                   "use a convolutional classifier, or name a node with "
                                   "model.segmenter.node if you mean it")
        if not maps:
            raise SegmenterProblem("none of its top-level modules gives a feature map "
                                   "(batch, channels, height, width); name one with "
                                   "model.segmenter.node")
        node = list(maps)[-1]
    if node not in maps:
        raise SegmenterProblem(f"model.segmenter.node={node!r} is not a top-level module that "
                               f"gives a feature map; one of {', '.join(maps) or 'none'}")
    return node, maps[node]


def segmenter_on(classifier: nn.Module, head: str, node: str, num_classes: int, size: int,
                 channels: int = 3) -> nn.Module:
    """A `head` model (deeplabv3 | fcn) on `classifier`'s map at `node` (auto: its last)."""
    if head not in HEADS:
        raise SegmenterProblem(f"head={head!r}: a classifier's map goes under one of "
                               f"{', '.join(HEADS)}")
    node, width = encoder_node(classifier, node, size, channels)
    model_type, make_head = HEADS[head]
    backbone = IntermediateLayerGetter(classifier, return_layers={node: "out"})
    return model_type(backbone, make_head(width, num_classes), None)
