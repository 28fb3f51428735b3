"""The classifier of every torchvision family is found and replaced; nothing else changes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from finetune.models import backbones, heads
from finetune.weights.load_report import LoadReport
from finetune.weights.loading import load_matching

warnings.filterwarnings("ignore", category=FutureWarning)

ALL_MODELS = backbones.list_backbones()

# What the issue and torchvision's own code name as each family's classifier.
EXPECTED = {
    "resnet": ["fc"], "resnext": ["fc"], "wide_resnet": ["fc"], "regnet": ["fc"],
    "shufflenet": ["fc"], "alexnet": ["classifier.6"], "vgg": ["classifier.6"],
    "densenet": ["classifier"], "squeezenet": ["classifier.1"],
    "inception_v3": ["fc", "AuxLogits.fc"], "googlenet": ["fc", "aux1.fc2", "aux2.fc2"],
    "vit": ["heads.head"], "swin": ["head"], "convnext": ["classifier.2"],
    "mobilenet_v2": ["classifier.1"], "mobilenet_v3": ["classifier.3"],
    "efficientnet": ["classifier.1"], "mnasnet": ["classifier.1"], "maxvit": ["classifier.5"],
}

# One small member of each family runs a real forward pass.
SMALL = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf",
         "shufflenet_v2_x0_5", "alexnet", "vgg11", "densenet121", "squeezenet1_1",
         "inception_v3", "googlenet", "vit_b_32", "swin_t", "convnext_tiny", "mobilenet_v2",
         "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "maxvit_t"]


def _expected(name: str) -> list[str]:
    family = max((f for f in EXPECTED if name.startswith(f)), key=len)
    return EXPECTED[family]


def _build_cheaply(name: str) -> nn.Module:
    """On the meta device (no memory, no init time); regnet computes widths with tensors,
    which meta cannot, so it is built for real."""
    if name.startswith("regnet"):
        return torchvision.models.get_model(name, weights=None)
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None)


def test_registry_covers_every_family() -> None:
    for name in ALL_MODELS:
        assert any(name.startswith(f) for f in EXPECTED), f"no expectation for {name}"
    assert len(ALL_MODELS) >= 80


@pytest.mark.parametrize("name", ALL_MODELS)
def test_head_found_and_replaced_for_every_model(name: str) -> None:
    model = _build_cheaply(name)
    assert heads.find_classifiers(model) == _expected(name)
    paths = heads.replace_heads(model, 7)
    assert paths == _expected(name)
    for path in paths:
        layer = model.get_submodule(path)
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        assert out == 7


def _input_size(name: str) -> int:
    entry = torchvision.models.get_model_weights(name).DEFAULT
    return max(32, entry.meta["min_size"][0]) if not name.startswith(("vit", "swin", "maxvit")) \
        else entry.meta["min_size"][0]


@pytest.mark.parametrize("name", SMALL)
def test_forward_shape_and_only_the_head_is_new(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)  # built once (inception: 5 s)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    paths = heads.replace_heads(model, 9)
    report = load_matching(model, checkpoint, LoadReport(source="file"))
    new = set(report.new)
    assert new and all(any(k.startswith(f"{p}.") for p in paths) for k in new)
    for key, value in model.state_dict().items():
        if key not in new:
            assert torch.equal(value, checkpoint[key]), key
    model.eval()
    size = _input_size(name)
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 9)


def test_mlp_head_with_dropout() -> None:
    model = torchvision.models.resnet18()
    heads.replace_heads(model, 4, dropout=0.2, hidden=[64, 32])
    fc = model.fc
    assert isinstance(fc, nn.Sequential)
    assert [type(m) for m in fc] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert fc[0].in_features == 512 and fc[-1].out_features == 4
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_conv_head_mlp_for_squeezenet() -> None:
    model = torchvision.models.squeezenet1_1()
    heads.replace_heads(model, 3, hidden=[16])
    assert isinstance(model.classifier[1][0], nn.Conv2d)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def _fresh_head(seed: int, classes: list[str], stream: int, hidden: tuple[int, ...] = ()
                ) -> list[torch.Tensor]:
    torch.manual_seed(stream)  # the global stream at build time: it must not matter
    model = torchvision.models.resnet18()
    paths = heads.replace_heads(model, len(classes), hidden=hidden)
    heads.seed_heads(model, paths, seed, classes)
    return [p.detach().clone() for p in model.fc.parameters()]


def test_a_new_head_starts_from_its_seed_and_classes_only() -> None:
    """Every case of the rule: the same seed and classes give the same start whatever the
    global stream held; another class list or another seed gives another; every layer of an
    MLP head is drawn again."""
    base = _fresh_head(0, ["5", "6", "7"], stream=1)
    again = _fresh_head(0, ["5", "6", "7"], stream=2)
    assert all(torch.equal(a, b) for a, b in zip(base, again, strict=True))
    for other in (_fresh_head(0, ["0", "1", "2"], 1), _fresh_head(1, ["5", "6", "7"], 1)):
        assert not torch.equal(base[0], other[0])
        corr = torch.corrcoef(torch.stack([base[0].flatten(), other[0].flatten()]))[0, 1]
        assert abs(float(corr)) < 0.2
    mlp = [_fresh_head(0, ["a", "b"], s, hidden=(16,)) for s in (1, 2)]
    assert len(mlp[0]) == 4 and all(torch.equal(a, b) for a, b in zip(*mlp, strict=True))
