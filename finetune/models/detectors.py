"""Detectors: torchvision's by name with their class layers sized for the data, or any
classifier's features under a Faster R-CNN, RetinaNet, FCOS or — for instance masks — a
Mask R-CNN (its box and mask predictors both sized for the data).

One rule for the classes, torchvision's own (its COCO weights have 91 outputs for 80
classes and a background slot): a detector for K object classes has K + 1 outputs, output 0
is the background and is never a target, and the data's class i is the detector's label
i + 1 (`LABEL_OFFSET`). Two-stage detectors and SSD score the background; RetinaNet and FCOS
score each class on its own and never see label 0.

Nothing is downloaded: every builder is called with `weights=None, weights_backbone=None`;
pretrained tensors load afterwards through the weight sources, by name and shape, as for a
classifier (the class layers, of another size, are reported new). Built that way a detector
has BatchNorm in its backbone where torchvision's builder, given pretrained weights, puts
FrozenBatchNorm2d (statistics and affine fixed: a detector trains on a few images per
step); `frozen_bn` gives it torchvision's layers back (`freeze_batchnorm`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

LABEL_OFFSET = 1  # the data's class i is the detector's label i + 1; 0 is the background

# torchvision's detectors by name, and what they find
FAMILIES = {"fasterrcnn": "boxes", "maskrcnn": "boxes and masks", "retinanet": "boxes",
            "fcos": "boxes", "ssd300": "boxes", "ssdlite320": "boxes"}
# what a classifier's features can go under (maskrcnn: instance masks)
HEADS = ("fasterrcnn", "retinanet", "fcos", "maskrcnn")
MASK_FAMILY = "boxes and masks"
# torchvision's detectors whose builders freeze their backbone's BatchNorm when given
# pretrained weights (`norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d`);
# the v2 models and SSD keep BatchNorm (checked against torchvision in tests/test_detectors.py)
FROZEN_BN_PRETRAINED = frozenset({
    "fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn"})


class DetectorProblem(Exception):
    """A detector that cannot be built as asked (the message says why and what to do)."""


def detector_names() -> list[str]:
    """torchvision's detectors that find boxes (keypoint R-CNN finds keypoints: not here)."""
    return [n for n in torchvision.models.list_models(module=torchvision.models.detection)
            if n.split("_")[0] in FAMILIES]


def finds_masks(name_or_head: str) -> bool:
    """Whether a detector by name (maskrcnn_resnet50_fpn) or a head (maskrcnn) finds masks."""
    return FAMILIES.get(name_or_head.split("_")[0]) == MASK_FAMILY


def freeze_batchnorm(module: nn.Module) -> int:
    """Every BatchNorm2d under `module` replaced by a FrozenBatchNorm2d holding its weight,
    bias, running statistics and eps (it computes what the layer does in eval mode, in
    training too, and trains nothing). The count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(child, key)
                if value is not None:
                    getattr(frozen, key).copy_(value.detach())
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


def build_detector(name: str, num_classes: int, masks: bool = False, frozen_bn: bool = False,
                   **kwargs: Any) -> nn.Module:
    """torchvision's detector `name` for `num_classes` object classes (K + 1 outputs),
    random weights; `kwargs` go to its builder (min_size, max_size, box_score_thresh...).
    `masks`: keep Mask R-CNN's mask branch (instance masks); otherwise it goes. `frozen_bn`:
    its backbone's body with FrozenBatchNorm2d as torchvision builds it for pretrained
    weights (without weights its builder makes them BatchNorm2d of FrozenBatchNorm2d's eps)."""
    if name not in detector_names():
        raise DetectorProblem(f"model.name={name!r} is not one of torchvision's detectors "
                              f"({', '.join(detector_names())}); a classifier's features "
                              f"can go under one of {', '.join(HEADS)} instead")
    if masks and not finds_masks(name):
        raise DetectorProblem(f"{name} finds no masks; instance masks need a Mask R-CNN "
                              f"({', '.join(n for n in detector_names() if finds_masks(n))}), "
                              "or a classifier under model.detector.head=maskrcnn")
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                         num_classes=num_classes + LABEL_OFFSET, **kwargs)
    if finds_masks(name) and not masks:
        # Mask R-CNN's boxes: its mask branch would need masks to train (segmentation's
        # data), so it goes; its box layers and their COCO weights stay (the mask tensors
        # of a COCO file are reported unused)
        roi = model.roi_heads
        roi.mask_roi_pool = roi.mask_head = roi.mask_predictor = None
    if frozen_bn:
        freeze_batchnorm(getattr(model.backbone, "body", model.backbone))
    return model


def class_layers(model: nn.Module) -> list[str]:
    """The paths of a detector's layers sized by its classes (the head a new class list
    replaces): a pretrained tensor there is of other classes, and is reported new."""
    wanted = ("roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits",
              "head.classification_head.cls_logits", "head.classification_head.module_list")
    names = {n for n, _ in model.named_modules()}
    return [w for w in wanted if w in names]


def unknown_arguments(model: nn.Module, given: Iterable[str], name: str | None = None
                      ) -> list[str]:
    """The keys of `given` that neither the detector's class (and its bases) nor, for a
    detector by `name`, its builder names: torchvision's detectors take **kwargs and hand them
    to their transform, which ignores what it does not know — a misspelt option would do
    nothing, silently."""
    callables = [k.__init__ for k in type(model).__mro__ if "__init__" in vars(k)
                 and k not in (nn.Module, object)]
    if name is not None:
        callables.append(torchvision.models.get_model_builder(name))
    known = {p.name for c in callables for p in inspect.signature(c).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [k for k in given if k not in known]


def feature_channels(features: nn.Module, size: int, channels: int = 3
                     ) -> list[tuple[str, int, int]]:
    """(name, channels, stride) of each map `features` returns for a `size` px image (a
    tensor or a dict of tensors), from one forward without autograd."""
    was_training = features.training
    features.eval()
    with torch.no_grad():
        out = features(torch.zeros(1, channels, size, size))
    features.train(was_training)
    maps = out if isinstance(out, dict) else {"0": out}
    found = []
    for key, value in maps.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 4:
            raise DetectorProblem(f"the backbone's output {key!r} is not a feature map "
                                  f"(batch, channels, height, width) but "
                                  f"{getattr(value, 'shape', type(value).__name__)}; cut the "
                                  "classifier before its pooling and classifier")
        found.append((str(key), int(value.shape[1]), max(1, round(size / value.shape[-1]))))
    return found


class SingleMap(nn.Module):
    """A feature extractor returning one map, named as the detectors expect (`out_channels`
    set): vgg16's features up to relu5_3, 512 channels at stride 16, as the Faster R-CNN
    paper used it."""

    def __init__(self, features: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = features
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(x))])


class WithFPN(nn.Module):
    """A classifier's intermediate maps (`body`: torchvision's feature extraction, by node
    name) through a feature pyramid network: every map `out_channels` wide, plus a pooled
    one."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int = 256
                 ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def backbone_of(classifier: nn.Module, nodes: list[str] | None, size: int,
                channels: int = 3) -> nn.Module:
    """The detector's backbone: `classifier` itself as one map (nodes None: it must already
    end in a feature map, as a cut does), or its maps at `nodes` through an FPN."""
    if not nodes:
        (_, width, _), *more = feature_channels(classifier, size, channels)
        if more:
            raise DetectorProblem("the backbone returns several maps; name them as FPN "
                                  "levels, or cut it to one")
        return SingleMap(classifier, width)
    try:
        body = create_feature_extractor(classifier, {n: str(i) for i, n in enumerate(nodes)})
    except (ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DetectorProblem(f"the FPN levels {nodes} are not all nodes of the backbone "
                              f"({first}); name modules whose outputs are feature maps, "
                              "e.g. layer2, layer3, layer4 of a ResNet") from None
    return WithFPN(body, [c for _, c, _ in feature_channels(body, size, channels)])


def detector_on(backbone: nn.Module, head: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A `head` detector (fasterrcnn, retinanet, fcos, maskrcnn) on `backbone` (SingleMap or
    WithFPN) for `num_classes` object classes; `kwargs` go to the detector (min_size,
    max_size...). One map gets one anchor level of five sizes and RoI pooling on it, as
    torchvision's fine-tuning tutorial builds it by hand; an FPN one size per level. Mask
    R-CNN pools 14 px for its masks where Faster R-CNN pools 7 for its boxes (torchvision's
    own sizes)."""
    if head not in HEADS:
        raise DetectorProblem(f"head={head!r}: a classifier's features go under one of "
                              f"{', '.join(HEADS)}")
    levels = 1 if isinstance(backbone, SingleMap) else len(backbone.fpn.inner_blocks) + 1
    outputs = num_classes + LABEL_OFFSET
    if head == "fcos":  # anchor-free: one point per location
        anchors = AnchorGenerator(tuple((8 * 2 ** i,) for i in range(levels)),
                                  ((1.0,),) * levels)
        return FCOS(backbone, outputs, anchor_generator=anchors, **kwargs)
    sizes = ((32, 64, 128, 256, 512),) if levels == 1 else tuple(
        (32 * 2 ** i,) for i in range(levels))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    if head == "retinanet":
        return RetinaNet(backbone, outputs, anchor_generator=anchors, **kwargs)
    names = [str(i) for i in range(levels - (0 if levels == 1 else 1))]
    pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    if head == "maskrcnn":
        masks = MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2)
        return MaskRCNN(backbone, outputs, rpn_anchor_generator=anchors, box_roi_pool=pool,
                        mask_roi_pool=masks, **kwargs)
    return FasterRCNN(backbone, outputs, rpn_anchor_generator=anchors, box_roi_pool=pool,
                      **kwargs)
