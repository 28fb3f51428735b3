"""Surgery by path: each op, its key map, the dry-forward checks and their messages."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from finetune.errors import FinetuneError
from finetune.models.surgery import apply_surgery


def test_replace_infers_input_size_by_dry_forward() -> None:
    result = apply_surgery(torchvision.models.resnet18(), [
        {"op": "replace", "path": "fc", "with": {"type": "Linear", "out_features": 3}}], 32)
    assert result.model.fc.in_features == 512 and result.model.fc.out_features == 3
    assert result.key_map == []


def test_insert_after_and_before_map_pretrained_keys() -> None:
    result = apply_surgery(torchvision.models.resnet18(), [
        {"op": "insert_after", "path": "layer4",
         "module": {"type": "Conv2d", "out_channels": 512, "kernel_size": 1}},
        {"op": "insert_before", "path": "layer1", "module": {"type": "BatchNorm2d"}}], 64)
    model = result.model
    assert isinstance(model.layer4[1], nn.Conv2d) and model.layer4[1].in_channels == 512
    assert isinstance(model.layer1[0], nn.BatchNorm2d) and model.layer1[0].num_features == 64
    assert result.map_key("layer4.0.conv1.weight") == "layer4.0.0.conv1.weight"
    assert result.map_key("layer1.1.bn2.bias") == "layer1.1.1.bn2.bias"
    assert result.map_key("conv1.weight") == "conv1.weight"
    assert result.map_key("layer4.0.conv1.weight") in model.state_dict()


def test_remove_becomes_identity() -> None:
    model = apply_surgery(torchvision.models.resnet18(), [
        {"op": "remove", "path": "maxpool"}], 32).model
    assert isinstance(model.maxpool, nn.Identity)


def test_vgg16_truncated_to_relu5_3() -> None:
    result = apply_surgery(torchvision.models.vgg16(), [
        {"op": "truncate", "path": "", "keep": ":1"},
        {"op": "truncate", "path": "features", "keep": ":-1"}], 224)
    model = result.model
    assert isinstance(model.features[-1], nn.ReLU) and len(model.features) == 30
    with torch.inference_mode():
        assert model.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 14, 14)
    reference = torchvision.models.vgg16().features[:-1]
    assert [k for k in model.state_dict()] == [f"features.{k}" for k in reference.state_dict()]


def test_rename_moves_keys_and_keeps_forward() -> None:
    result = apply_surgery(torchvision.models.resnet18(num_classes=4), [
        {"op": "rename", "path": "fc", "to": "fclass"}], 32)
    model = result.model
    assert "fclass.weight" in model.state_dict() and "fc.weight" not in model.state_dict()
    assert sum(1 for _ in model.parameters()) == sum(
        1 for _ in torchvision.models.resnet18().parameters())
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert result.map_key("fc.bias") == "fclass.bias"


@pytest.mark.parametrize(("op", "message"), [
    ({"op": "remove", "path": "layer5"}, r"surgery\[0\]\.path='layer5' matches no module .*did "
                                         r"you mean 'layer4'"),
    ({"op": "replce", "path": "fc"}, r"op='replce' is not a surgery op \(did you mean "
                                     r"'replace'"),
    ({"op": "replace", "path": "fc", "with": {"type": "Linaer", "out_features": 2}},
     r"unknown layer type 'Linaer' \(did you mean 'Linear'"),
    ({"op": "replace", "path": "fc", "with": {"type": "Linear", "in_features": 100,
                                              "out_features": 2}},
     r"surgery\[0\] \(replace fc\): the model no longer runs .*2x512 and 100x2"),
    ({"op": "truncate", "path": "layer1", "keep": "5:"}, r"keeps nothing of layer1"),
    # a name nn.Module (or the model) already has: it would shadow it, or crash in eval()
    ({"op": "rename", "path": "fc", "to": "training"},
     r"surgery\[0\] \(rename fc\): to='training' is already an attribute of ResNet of the "
     "model; choose a name it does not have"),
    ({"op": "rename", "path": "fc", "to": "layer1"}, r"to='layer1' is already a module of"),
    ({"op": "rename", "path": "layer1.0.bn1", "to": "forward"},
     r"to='forward' is already an attribute of BasicBlock of layer1.0"),
])
def test_surgery_mistakes_name_the_op_path_and_fix(op: dict, message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        apply_surgery(torchvision.models.resnet18(), [op], 32)
