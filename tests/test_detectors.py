"""Detectors for the data's classes: torchvision's by name (K + 1 outputs, 0 the background),
and a classifier's features under Faster R-CNN, RetinaNet or FCOS — vgg16 cut at relu5_3 as
one map (512 channels, stride 16), a ResNet's stages through an FPN — each taking a real
training step on digit canvases and predicting boxes inside the image."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

from finetune.data.canvases import digit_canvases
from finetune.data.instance_masks import canvas_instances
from finetune.models.detectors import (
    FROZEN_BN_PRETRAINED,
    HEADS,
    LABEL_OFFSET,
    DetectorProblem,
    SingleMap,
    WithFPN,
    backbone_of,
    build_detector,
    detector_names,
    detector_on,
    feature_channels,
    finds_masks,
    freeze_batchnorm,
)
from finetune.training.detection_plan import frozen_bn
from tests.conftest import save_torchvision_checkpoint

SIZE = 64
CLASSES = ["1", "4", "7"]


def _batch(count: int = 2) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    canvases = digit_canvases(count, size=SIZE, digits=[1, 4, 7], seed=0)
    images = [torch.from_numpy(c.pixels).float().div(255).expand(3, -1, -1) for c in canvases]
    targets = [{"boxes": torch.tensor([b[:4] for b in c.boxes], dtype=torch.float32),
                "labels": torch.tensor([CLASSES.index(b[4]) + LABEL_OFFSET for b in c.boxes]),
                "masks": torch.from_numpy(np.stack(canvas_instances(c.pixels, c.boxes))
                                          ).to(torch.uint8)}
               for c in canvases]
    return images, targets


def _step_and_predict(model: nn.Module) -> None:
    """One SGD step on two canvases (every loss finite, every trained tensor moved), then
    boxes predicted inside the image, with labels of the data's classes."""
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert losses and all(math.isfinite(float(v.detach())) for v in losses.values()), losses
    masked = isinstance(model, MaskRCNN) and model.roi_heads.mask_predictor is not None
    assert ("loss_mask" in losses) == masked
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    sum(losses.values()).backward()
    torch.optim.SGD(trainable, lr=0.01).step()
    assert sum(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True)) > 0
    model.eval()
    with torch.no_grad():
        found = model(images)
    assert len(found) == 2
    for output in found:
        boxes, labels = output["boxes"], output["labels"]
        assert boxes.shape[1:] == (4,) and len(labels) == len(boxes) == len(output["scores"])
        assert ((boxes >= 0) & (boxes <= SIZE)).all()
        assert set(labels.tolist()) <= {1, 2, 3}
        if masked:  # a mask per box, the image's size
            assert output["masks"].shape == (len(boxes), 1, SIZE, SIZE)


def _class_outputs(model: nn.Module) -> int:
    if hasattr(model, "roi_heads"):
        return model.roi_heads.box_predictor.cls_score.out_features
    head = model.head.classification_head
    return getattr(head, "num_classes", None) or head.num_columns


@pytest.mark.parametrize("name", detector_names())
def test_every_torchvision_detector_gets_k_plus_one_outputs(name: str) -> None:
    with torch.device("meta"):
        model = build_detector(name, len(CLASSES))
    assert _class_outputs(model) == len(CLASSES) + 1
    if name.startswith("maskrcnn"):  # its boxes: the mask branch is gone (no masks to train)
        assert not model.roi_heads.has_mask()
        assert not [n for n, _ in model.named_modules() if "mask" in n]


def test_mask_rcnn_trains_its_boxes_without_masks() -> None:
    """Box data has no masks: Mask R-CNN by name trains and finds boxes as a Faster R-CNN
    with Mask R-CNN's box layers (a mask branch would fail its first step for want of
    targets' masks)."""
    torch.manual_seed(0)
    _step_and_predict(build_detector("maskrcnn_resnet50_fpn", len(CLASSES), min_size=SIZE,
                                     max_size=SIZE))


def test_the_list_is_torchvisions_box_detectors() -> None:
    names = detector_names()
    assert {"fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
            "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
            "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn"} <= set(names)
    assert not [n for n in names if n.startswith("keypointrcnn")]


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn",
                                  "ssdlite320_mobilenet_v3_large"])
def test_a_torchvision_detector_trains_and_predicts(name: str) -> None:
    torch.manual_seed(0)
    # SSDlite's input size is fixed (320 px): it resizes, and maps its boxes back
    kwargs = {} if name.startswith("ssd") else {"min_size": SIZE, "max_size": SIZE}
    _step_and_predict(build_detector(name, len(CLASSES), **kwargs))


def test_vgg16_to_relu5_3_under_faster_rcnn_is_the_seeds_network() -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    features = vgg.features[:-1]  # up to relu5_3: the last max-pool left out
    assert isinstance(features[-1], nn.ReLU) and isinstance(vgg.features[-1], nn.MaxPool2d)
    assert feature_channels(features, SIZE) == [("0", 512, 16)]
    backbone = backbone_of(features, None, SIZE)
    assert isinstance(backbone, SingleMap) and backbone.out_channels == 512
    model = detector_on(backbone, "fasterrcnn", len(CLASSES), min_size=SIZE, max_size=SIZE)
    # the classifier's tensors are the backbone's, not copies
    assert model.backbone.body[0].weight is vgg.features[0].weight
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    _step_and_predict(model)


@pytest.mark.parametrize("head", HEADS)
def test_a_resnets_stages_through_an_fpn_under_each_head(head: str) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    backbone = backbone_of(resnet, ["layer2", "layer3", "layer4"], SIZE)
    assert isinstance(backbone, WithFPN)
    assert [c for _, c, _ in feature_channels(backbone.body, SIZE)] == [128, 256, 512]
    assert [s for _, _, s in feature_channels(backbone, SIZE)] == [8, 16, 32, 64]
    model = detector_on(backbone, head, len(CLASSES), min_size=SIZE, max_size=SIZE)
    assert _class_outputs(model) == len(CLASSES) + 1
    if head == "fasterrcnn":  # RoI pooling over every stage's level (not the pooled one)
        assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    body = dict(model.backbone.body.named_parameters())
    assert torch.equal(body["layer3.0.conv1.weight"], resnet.layer3[0].conv1.weight)
    _step_and_predict(model)


def test_a_timm_classifiers_stages_through_an_fpn() -> None:
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False)
    backbone = backbone_of(net, ["layer2", "layer3", "layer4"], SIZE)
    _step_and_predict(detector_on(backbone, "fasterrcnn", len(CLASSES), min_size=SIZE,
                                  max_size=SIZE))


def test_what_cannot_be_a_detector_is_one_sentence() -> None:
    with pytest.raises(DetectorProblem, match=r"^model.name='resnet18' is not one of "
                                              r"torchvision's detectors \(fasterrcnn_"):
        build_detector("resnet18", 3)
    resnet = torchvision.models.resnet18()
    with pytest.raises(DetectorProblem, match=r"^the backbone's output '0' is not a feature "
                                              r"map .* but torch.Size\(\[1, 1000\]\); cut"):
        backbone_of(resnet, None, SIZE)
    with pytest.raises(DetectorProblem, match=r"^the FPN levels \['layer2', 'layer9'\] are "
                                              r"not all nodes of the backbone"):
        backbone_of(resnet, ["layer2", "layer9"], SIZE)
    with pytest.raises(DetectorProblem, match=r"^head='ssd': a classifier's features go "
                                              r"under one of fasterrcnn, retinanet, fcos, "
                                              r"maskrcnn$"):
        detector_on(SingleMap(resnet.layer1, 64), "ssd", 3)


def _norms(model: nn.Module) -> dict[str, tuple[str, float]]:
    return {n: (type(m).__name__, m.eps) for n, m in model.named_modules()
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}


@pytest.fixture(scope="module")
def backbone_home(torch_home: Path) -> Path:
    """torch's cache with the backbones torchvision's detectors start from by default:
    resnet50 (IMAGENET1K_V2) and mobilenet_v3_large (IMAGENET1K_V2), random."""
    save_torchvision_checkpoint(torch_home, "mobilenet_v3_large", "IMAGENET1K_V2")
    return torch_home


@pytest.mark.parametrize("name", detector_names())
def test_a_pretrained_detectors_batchnorm_is_as_torchvision_builds_it(
        name: str, backbone_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's builder given pretrained (backbone) weights, read from its own cache
    (our random files): every normalization layer of ours — built without weights, frozen by
    the rule `auto` applies to pretrained runs — has its type and eps, path for path."""
    monkeypatch.setenv("TORCH_HOME", str(backbone_home))
    with torch.device("meta"):
        ours = build_detector(name, len(CLASSES), finds_masks(name),
                              frozen_bn=name in FROZEN_BN_PRETRAINED)
        if name == "ssd300_vgg16":  # its VGG has no normalization layer to freeze
            assert _norms(ours) == {}
            return
        with warnings.catch_warnings():  # meta tensors take no values: the types are compared
            warnings.simplefilter("ignore")
            theirs = torchvision.models.get_model(name, weights=None, weights_backbone="DEFAULT",
                                                  num_classes=len(CLASSES) + 1)
    assert _norms(ours) == _norms(theirs) and _norms(ours)
    frozen = [n for n, (kind, _) in _norms(ours).items() if kind == "FrozenBatchNorm2d"]
    assert bool(frozen) == (name in FROZEN_BN_PRETRAINED)
    assert all(n.startswith("backbone.body.") for n in frozen)


@pytest.mark.parametrize("value", ["auto", True, False])
def test_frozen_bn_rule_on_every_case(value: object) -> None:
    """auto: frozen for torchvision's detectors that freeze it, when the run's weights are
    pretrained (any source but none); never for a classifier under a detector head; true and
    false as said."""
    for name in [*detector_names(), "resnet18", "convnext_tiny"]:
        for source in ("none", "torchvision", "run", "recipe", "file", "timm"):
            cfg = OmegaConf.create({"model": {"name": name, "detector": {"frozen_bn": value}},
                                    "weights": {"source": source}})
            want = (name in FROZEN_BN_PRETRAINED and source != "none") if value == "auto" \
                else value
            assert frozen_bn(cfg) is want, (name, source, value)


def test_a_frozen_batchnorm_computes_the_layers_eval_output_and_trains_nothing() -> None:
    """Swapped in, each BatchNorm2d becomes a FrozenBatchNorm2d with its statistics, affine
    and eps: the output is the layer's in eval mode, in train mode too;
    nothing of it is a parameter, and its state has no num_batches_tracked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3),
                          nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    for bn in (model[1], model[2][1]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model.eval()(x)
        assert freeze_batchnorm(model) == 2
        assert [m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)] == [1e-3,
                                                                                       1e-5]
        assert torch.allclose(model.train()(x), want, atol=1e-6)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    assert not [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
