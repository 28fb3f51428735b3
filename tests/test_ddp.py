"""DDP across two CPU processes (gloo), launched by Lightning under Hydra: one run dir, its
artifacts written once, frozen tensors untouched and every tensor the same on both ranks,
including those an unfreeze phase opened after DDP wrapped the model. The run names a
plugin's data format, task and schedule: each rank imports finetune afresh and finds them."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file

from tests.conftest import read_json, run_cli
from tests.stripes_plugin import RECIPE, install


def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), init)
    (tmp_path / "stripes.yaml").write_text(RECIPE)
    env = install(tmp_path / "site")
    run = tmp_path / "run"
    result = run_cli(
        "recipe=stripes.yaml", "data.batch_size=4", "weights.source=file",
        f"weights.path={init}", "freeze.train_from=layer4",
        "freeze.unfreeze=[{epoch:1,train_from:layer3,lr_mult:0.5}]", "trainer.max_epochs=2",
        "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "eval.report=false", f"hydra.run.dir={run}",
        # the options that draw per rank compose with DDP (ranks stay identical)
        "data.sampler=balanced", "data.mix.mixup_alpha=0.2",
        "trainer.early_stopping.patience=5", cwd=tmp_path, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["world_size"] == 2
    assert metrics["ddp"] == {"world_size": 2, "frozen_tensors_identical_across_ranks": True,
                              "trained_tensors_identical_across_ranks": True}
    # the plugin's names, found by both ranks, recorded
    manifest = read_json(run / "manifest.json")
    assert (metrics["task"], manifest["task"], manifest["class_names"]) == (
        "binary", "binary", ["vertical", "horizontal"])
    assert (manifest["config"]["data"]["name"], manifest["config"]["sched"]["name"]) == (
        "stripes", "linear")
    # written once, by rank zero: one of each artifact, nothing beside the run dir
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "init.pt", "run", "site", "stripes.yaml"]
    assert len(list(run.rglob("metrics.json"))) == 1
    assert len(list(run.rglob("*.safetensors"))) == 1
    assert "finetune: done" in result.stdout and result.stdout.count("finetune: done") == 1
    # the frozen prefix is bit-identical to the initial weights; the rest trained
    weights, start = load_file(run / "model.safetensors"), torch.load(init, weights_only=True)
    frozen = [k for k in start if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    assert all(torch.equal(weights[k], start[k]) for k in frozen)
    assert not torch.equal(weights["layer3.0.conv1.weight"], start["layer3.0.conv1.weight"])
    # validation was split across ranks and gathered: every image once
    with open(run / "val_predictions.csv", newline="") as handle:
        items = [row["item"] for row in csv.DictReader(handle)]
    assert len(items) == len(set(items)) == metrics["val_images"] == 8
    log = (run / "finetune.log").read_text()
    assert "unfreeze at epoch 1: train_from: layer3" in log


def test_multilabel_under_ddp_validates_every_image_once(tmp_path: Path) -> None:
    """The label sets' probabilities are gathered across ranks (a 2-D gather): the
    thresholds are tuned on every validation image, once each."""
    run = tmp_path / "run"
    result = run_cli(
        "recipe=digits_multilabel", "data.classes=[1,4,7,8]", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "data.batch_size=8", "trainer.strategy=ddp",
        "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    # output to a file (a pipe here): one line per epoch, from rank zero, and no bar frames
    assert re.findall(r"^finetune: epoch 0 of 1: .*val/loss", result.stdout, re.M) != []
    assert result.stdout.count("finetune: epoch 0 of 1:") == 1
    assert "\r" not in result.stdout + result.stderr and "it/s]" not in result.stderr
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["world_size"] == 2
    assert metrics["ddp"]["trained_tensors_identical_across_ranks"]
    with open(run / "val_predictions.csv", newline="") as handle:
        items = [row["item"] for row in csv.DictReader(handle)]
    assert len(items) == len(set(items)) == metrics["val_images"]
    assert set(read_json(run / "manifest.json")["thresholds"]) == {"even", "over_4", "prime"}
