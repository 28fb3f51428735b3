"""The fast paths are one key each: trainer.precision, model.channels_last, model.compile;
each composes and trains a step on CPU under the real Trainer. And in-memory data without
random augmentation is transformed once."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf

from finetune.compose.prepare import compose_config
from finetune.compose.schema import OptimConfig, SchedConfig
from finetune.data.datamodule import ImageDataModule, TensorImages
from finetune.data.readers import fake_data
from finetune.data.transforms import eval_transform, train_transform
from finetune.models import heads
from finetune.models.backbones import preprocessing
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.lightning_module import FinetuneModule, StepOptions

warnings.filterwarnings("ignore")


def _step(name: str, precision: str = "32-true", channels_last: bool = False,
          compile: bool = False, size: int = 32) -> FinetuneModule:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name)
    heads.replace_heads(model, 4)
    plan = plan_freeze(model, None)
    apply_freeze(model, plan)
    split, names = fake_data(16, 4, size, seed=0)
    data = TensorImages(split.items, split.labels, eval_transform(preprocessing(None, size)))
    module = FinetuneModule(model, 4, plan, OmegaConf.structured(OptimConfig),
                            OmegaConf.structured(SchedConfig),
                            options=StepOptions(channels_last=channels_last, compile=compile))
    before = model.state_dict()[next(n for n, p in model.named_parameters())].clone()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                         accelerator="cpu", precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=ImageDataModule(data, data, names, 8, 0))
    after = model.state_dict()[next(n for n, p in model.named_parameters())]
    assert not torch.equal(before, after), "the step changed nothing"
    return module


def test_fast_path_keys_compose() -> None:
    cfg, _ = compose_config(["recipe=quickstart", "trainer.precision=bf16-mixed",
                             "model.channels_last=true", "model.compile=true"])
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.channels_last is True and cfg.model.compile is True


def test_bf16_mixed_and_channels_last_train_a_step() -> None:
    module = _step("resnet18", precision="bf16-mixed", channels_last=True)
    conv = module.model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not os.environ.get("FINETUNE_TEST_COMPILE"),
                    reason="torch.compile on CPU spends 40 s or more compiling even a small "
                           "network on 2 cores; set FINETUNE_TEST_COMPILE=1 to run it")
def test_compile_trains_a_step_and_keeps_the_state_dict() -> None:
    module = _step("squeezenet1_1", compile=True)
    assert type(module._forward).__name__ == "OptimizedModule"
    assert not any("_orig_mod" in k for k in module.state_dict())


def test_in_memory_data_without_augmentation_is_transformed_once() -> None:
    split, _ = fake_data(8, 2, 32, seed=0)
    prep = preprocessing(None, 32)
    plain = TensorImages(split.items, split.labels, eval_transform(prep))
    assert plain.ready is not None and plain.ready.shape == (8, 3, 32, 32)
    assert torch.equal(plain[3][0], eval_transform(prep)(split.items[3]))
    augmented = TensorImages(split.items, split.labels,
                             train_transform(prep, ["RandomHorizontalFlip"]), random=True)
    assert augmented.ready is None  # a new draw every time it is read


@pytest.mark.parametrize("channels", [1, 3])
def test_the_precomputed_tensors_are_each_images_own_bit_for_bit(channels: int,
                                                                 monkeypatch) -> None:
    """Transformed in chunks of images at once (across chunk borders), they equal one call
    per image; a transform that makes views per image (test-time augmentation's five crops)
    is applied per image and keeps its (views, C, H, W) items."""
    import finetune.data.datamodule as datamodule
    from finetune.data.transforms import tta_transform

    monkeypatch.setattr(datamodule, "PRECOMPUTE_CHUNK", 3)
    split, _ = fake_data(8, 2, 48, seed=1)
    prep = dataclasses.replace(preprocessing(None, 32), resize=40, channels=channels,
                               mean=[0.5] * channels, std=[0.25] * channels)
    for transform in (eval_transform(prep), tta_transform(prep, "crops")):
        ready = TensorImages(split.items, split.labels, transform).ready
        assert ready is not None and type(ready) is torch.Tensor
        assert torch.equal(ready, torch.stack([transform(x) for x in split.items]))
    assert ready.shape == (8, 5, channels, 32, 32)
