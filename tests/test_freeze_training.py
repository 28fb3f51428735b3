"""Freeze guarantees under a real Lightning Trainer: frozen tensors stay bit-identical (with
momentum and weight decay, through validation), BatchNorm policies, the frozen prefix builds
no autograd graph, and unfreeze phases join the running optimizer under every schedule."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf

from finetune.compose.schema import OptimConfig, SchedConfig
from finetune.data.datamodule import ImageDataModule, TensorImages
from finetune.data.readers import fake_data
from finetune.data.transforms import eval_transform
from finetune.models import heads
from finetune.models.backbones import preprocessing
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.lightning_module import FinetuneModule

warnings.filterwarnings("ignore")
CLASSES = 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    heads.replace_heads(model, CLASSES)
    return model


def _fit(model: torch.nn.Module, plan, epochs: int = 2, sched: str = "cosine",
         **optim) -> tuple[FinetuneModule, pl.Trainer]:
    prep = preprocessing(None, 32)
    split, names = fake_data(48, CLASSES, 32, seed=0)
    transform = eval_transform(prep)
    data = ImageDataModule(TensorImages(split.items, split.labels, transform),
                           TensorImages(split.items[:16], split.labels[:16], transform),
                           names, batch_size=16, num_workers=0)
    cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig),
                          {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.1,
                           **optim})
    module = FinetuneModule(model, CLASSES, plan, cfg,
                            OmegaConf.structured(SchedConfig(name=sched, step_size=1)))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return module, trainer


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bn", ["frozen", "affine", "train"])
def test_frozen_tensors_stay_bit_identical_under_momentum_and_weight_decay(bn: str) -> None:
    model = _model()
    plan = plan_freeze(model, "layer3", bn=bn)
    apply_freeze(model, plan)
    before = _snapshot(model)
    _fit(model, plan)
    after = model.state_dict()
    prefix = ("conv1.", "bn1.", "layer1.", "layer2.")
    convs = [k for k in before if (k.startswith(prefix) and ".conv" in k) or k == "conv1.weight"]
    bn_affine = [k for k in before if k.startswith(prefix) and k.endswith(("bn1.weight",
                                                                           "bn2.bias"))]
    bn_stats = [k for k in before if k.startswith(prefix) and k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))]
    assert convs and bn_affine and bn_stats
    assert all(torch.equal(before[k], after[k]) for k in convs)
    same_affine = [torch.equal(before[k], after[k]) for k in bn_affine]
    same_stats = [torch.equal(before[k], after[k]) for k in bn_stats]
    if bn == "frozen":
        assert all(same_affine) and all(same_stats)
    elif bn == "affine":
        assert not any(same_affine) and all(same_stats)
    else:
        assert all(same_affine) and not all(same_stats)
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert not torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])


def _saved_bytes(model: torch.nn.Module) -> tuple[int, dict[str, bool]]:
    """Bytes of activations autograd keeps for backward in one training forward (parameters,
    which it also keeps, are not counted), and whether each stage's output is in a graph."""
    graph: dict[str, bool] = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda _m, _i, out, name=name: graph.__setitem__(name, out.grad_fn is not None))
        for name in ("layer2", "layer3", "layer4")]
    saved = []
    weights = {p.data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(8, 3, 64, 64)).sum().backward()
    for hook in hooks:
        hook.remove()
    return sum(saved), graph


def test_frozen_prefix_builds_no_autograd_graph() -> None:
    full_model = _model()
    full, _ = _saved_bytes(full_model)
    model = _model()
    apply_freeze(model, plan_freeze(model, "layer4"))
    partial, graph = _saved_bytes(model)
    assert graph == {"layer2": False, "layer3": False, "layer4": True}
    assert partial < 0.1 * full
    assert all(p.grad is None for p in model.layer3.parameters())


@pytest.mark.parametrize("sched", ["none", "cosine", "step", "onecycle", "plateau"])
def test_an_unfreeze_phase_joins_the_running_optimizer(sched: str) -> None:
    model = _model()
    plan = plan_freeze(model, "fc", unfreeze=[{"epoch": 1, "train_from": "layer4",
                                               "lr": 0.05, "warmup_epochs": 1}])
    apply_freeze(model, plan)
    before = _snapshot(model)
    module, trainer = _fit(model, plan, epochs=3, sched=sched, weight_decay=0.0)
    optimizer = trainer.optimizers[0]
    assert [g["name"] for g in optimizer.param_groups] == ["fc", "layer4"]
    assert optimizer.param_groups[1]["base_lr"] == 0.05
    assert module.stages == 2 and all(p.requires_grad for p in model.layer4.parameters())
    assert not torch.equal(before["layer4.1.conv2.weight"], model.layer4[1].conv2.weight)
    assert torch.equal(before["layer3.1.conv2.weight"], model.layer3[1].conv2.weight)
    assert trainer.callback_metrics["lr-layer4"] > 0
