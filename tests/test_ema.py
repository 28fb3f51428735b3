"""An EMA of the weights (model.ema): equal to an EMA computed independently from the
training trajectory; validated, saved and used by predict; resumed bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from conftest import QUICK, SHRINK, problems_here, read_json, train_here
from omegaconf import OmegaConf
from safetensors.torch import load_file

from finetune.compose.schema import OptimConfig, SchedConfig
from finetune.data.datamodule import ImageDataModule, TensorImages
from finetune.data.readers import fake_data
from finetune.data.transforms import eval_transform
from finetune.models import heads
from finetune.models.backbones import preprocessing
from finetune.training.callbacks import EMA
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.lightning_module import FinetuneModule


class Trajectory(pl.Callback):
    """The model's floating-point tensors after every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.epochs: list[int] = []
        self.val_losses: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_losses.append(float(trainer.callback_metrics["val/loss"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict()
                            .items() if v.is_floating_point()})
        self.epochs.append(trainer.current_epoch)


def _fit(ema: EMA | None, epochs: int = 2) -> tuple[FinetuneModule, Trajectory, pl.Trainer]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    heads.replace_heads(model, 4)
    plan = plan_freeze(model, "layer4")
    apply_freeze(model, plan)
    split, names = fake_data(48, 4, 32, seed=0)
    transform = eval_transform(preprocessing(None, 32))
    data = ImageDataModule(TensorImages(split.items[:32], split.labels[:32], transform),
                           TensorImages(split.items[32:], split.labels[32:], transform),
                           names, batch_size=8, num_workers=0)
    optim = OmegaConf.merge(OmegaConf.structured(OptimConfig), {"name": "sgd", "lr": 0.05})
    module = FinetuneModule(model, 4, plan, optim, OmegaConf.structured(SchedConfig()))
    trajectory = Trajectory()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[*([ema] if ema else []), trajectory])
    trainer.fit(module, datamodule=data)
    return module, trajectory, trainer


def test_the_saved_weights_are_the_ema_of_the_trajectory() -> None:
    """decay 0.9 from epoch 1: the first update copies the weights, each later step
    ema = 0.9 ema + 0.1 w, exactly; before epoch 1 validation saw the live weights."""
    ema = EMA(0.9, start_epoch=1)
    module, trajectory, _ = _fit(ema)
    steps = [s for s, e in zip(trajectory.states, trajectory.epochs, strict=True) if e >= 1]
    expected = dict(steps[0])
    for state in steps[1:]:
        expected = {k: 0.9 * expected[k] + (1 - 0.9) * state[k] for k in expected}
    final = module.model.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert not torch.equal(final["fc.weight"], trajectory.states[-1]["fc.weight"])
    assert ema.summary() == {"decay": 0.9, "start_epoch": 1, "updates": len(steps),
                             "weights": "ema"}
    assert ema.updates() == 4 and len(trajectory.states) == 8
    _, plain, _ = _fit(None, epochs=1)  # the same epoch 0 without an EMA
    assert plain.val_losses[0] == trajectory.val_losses[0]  # validated the live weights


def test_a_run_saves_predicts_and_resumes_with_the_ema(tmp_path: Path) -> None:
    args = [*QUICK, *SHRINK, "model.ema.decay=0.8", "sched.epochs=3", "checkpoint.keep=last",
            "freeze.train_from=layer4"]
    whole = train_here(*args, "trainer.max_epochs=3", run_dir=tmp_path / "whole")
    manifest = read_json(whole / "manifest.json")
    assert manifest["ema"] == {"decay": 0.8, "start_epoch": 0, "updates": 6, "weights": "ema"}
    assert read_json(whole / "metrics.json")["ema"] == manifest["ema"]
    saved = load_file(whole / "model.safetensors")
    checkpoint = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    ema_state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    live = {k.removeprefix("model."): v for k, v in checkpoint["current_model_state"].items()}
    assert all(torch.equal(saved[k], ema_state[k]) for k in saved)
    assert not torch.equal(saved["fc.weight"], live["fc.weight"])
    part = train_here(*args, "trainer.max_epochs=2", run_dir=tmp_path / "part")
    resumed = train_here(*args, "trainer.max_epochs=3", "resume=auto", run_dir=part)
    again = load_file(resumed / "model.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    assert read_json(resumed / "manifest.json")["ema"]["updates"] == 6
    last = whole / "checkpoints" / "last.ckpt"  # without the EMA it would train on from it
    assert problems_here(*args[:2], *SHRINK, "sched.epochs=3", "freeze.train_from=layer4",
                         "trainer.max_epochs=3", f"resume={last}", run_dir=tmp_path / "x") == [
        f"resume={last}: the checkpoint was written with model.ema (its state_dict is the EMA, "
        "the live weights are kept apart); resume with the same model.ema.decay, or start a "
        f"new run from its EMA weights (weights.source=file weights.path={last})"]


def test_an_ema_that_never_starts_is_refused() -> None:
    assert problems_here(*QUICK, "model.ema.decay=0.99", "model.ema.start_epoch=3",
                         "trainer.max_epochs=3") == [
        "model.ema.start_epoch=3 is never reached (the run has 3 epochs, 0..2): the EMA would "
        "never be updated; lower it or raise trainer.max_epochs"]
    assert problems_here(*QUICK, "model.ema.decay=1.0")[0].startswith(
        "model.ema.decay=1.0: must be in (0, 1)")
