"""The LightningModule's loss and BatchNorm handling, without a Trainer."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf

from finetune.compose.schema import OptimConfig, SchedConfig
from finetune.models import heads
from finetune.tasks.table import TASKS
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.lightning_module import FinetuneModule, StepOptions

warnings.filterwarnings("ignore")


def _module(model, aux_weight: float = 0.4, train_from=None, **kwargs) -> FinetuneModule:
    plan = plan_freeze(model, train_from)
    apply_freeze(model, plan)
    return FinetuneModule(model, 5, plan, OmegaConf.structured(OptimConfig),
                          OmegaConf.structured(SchedConfig),
                          options=StepOptions(aux_weight=aux_weight), **kwargs)


def test_the_training_loss_takes_the_mixed_batch_and_class_weights() -> None:
    """data.mix and loss.class_weights reach the training step: the loss is the weighted
    soft-target cross-entropy of the mixed batch, exactly."""
    from finetune.data.mixing import BatchMix

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    heads.replace_heads(model, 5)
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    module = _module(model, mix=BatchMix(5, mixup_alpha=0.4), class_weights=weights).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 4])
    torch.manual_seed(1)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(1)
    mixed, target = BatchMix(5, mixup_alpha=0.4)(x, y)
    expected = F.cross_entropy(model(mixed), target, weight=torch.tensor(weights))
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(model(x), y))


def test_auxiliary_logits_add_weighted_loss() -> None:
    torch.manual_seed(0)
    model = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    heads.replace_heads(model, 5)
    module = _module(model, aux_weight=0.3).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(1)
    logits, aux2, aux1 = model(x)
    expected = F.cross_entropy(logits, y) + 0.3 * (F.cross_entropy(aux2, y)
                                                  + F.cross_entropy(aux1, y))
    assert torch.allclose(loss, expected)
    assert module(x).shape == (4, 5)  # forward gives the main logits only


def test_train_mode_keeps_frozen_batchnorm_in_eval() -> None:
    model = torchvision.models.resnet18()
    heads.replace_heads(model, 5)
    module = _module(model, train_from="layer3")
    module.eval()
    module.train()  # what Lightning does after every validation
    assert not model.bn1.training and not model.layer2[1].bn2.training
    assert model.layer3[0].bn1.training and model.fc.training


def test_the_multilabel_loss_is_bce_with_the_labels_pos_weight() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    heads.replace_heads(model, 5)
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    module = _module(model, class_weights=weights, task=TASKS["multilabel"]).train()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
                     dtype=torch.float32)
    torch.manual_seed(1)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(1)
    expected = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=torch.tensor(weights))
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, F.binary_cross_entropy_with_logits(model(x), y))
