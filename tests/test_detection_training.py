"""A detector trains as a classifier does: stopped and resumed it ends where the
uninterrupted run does, bit for bit, across an unfreeze; under DDP on two CPU processes its
ranks stay identical and its validation boxes are gathered in the data's order; a split
sweep over the detector's own paths ranks its jobs by val/map. The resume and DDP tests run
a Mask R-CNN on instance masks too."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import ranked_leaderboard, read_json, run_cli, train_here
from safetensors.torch import load_file
from torchvision.ops.misc import FrozenBatchNorm2d

import finetune
from finetune.commands.evaluate import evaluate_run

TINY = ["recipe=digits_detection", "weights.source=none", "trainer.limit_train_batches=3",
        "data.canvases.count=24", "data.canvases.size=64", "data.batch_size=4",
        "trainer.enable_progress_bar=false"]
# a stage that joins at epoch 1 with its own lr, momentum and weight decay in play
PHASES = ["freeze.train_from=backbone.fpn", "sched.epochs=3",
          "freeze.unfreeze=[{epoch:1,train_from:backbone.body.layer4,lr_mult:0.5}]"]


def _boxes_by_item(path: Path) -> dict[str, list[list[str]]]:
    found: dict[str, list[list[str]]] = defaultdict(list)
    with open(path, newline="") as handle:
        for row in list(csv.reader(handle))[1:]:
            found[row[0]].append(row[1:])
    return dict(found)


@pytest.mark.parametrize("recipe", ["digits_detection", "digits_instances"])
def test_a_resumed_detector_equals_the_uninterrupted_run(tmp_path: Path, recipe: str) -> None:
    """Boxes, and a Mask R-CNN's masks too: the resumed run's weights, optimizer state,
    figures (mask mAP among them) and validation boxes are the uninterrupted run's."""
    tiny = [f"recipe={recipe}", *TINY[1:]]
    whole = train_here(*tiny, *PHASES, "trainer.max_epochs=3", run_dir=tmp_path / "whole")
    first = train_here(*tiny, *PHASES, "trainer.max_epochs=1", run_dir=tmp_path / "first")
    last = train_here(*tiny, *PHASES, "trainer.max_epochs=3", f"resume={first}",
                      run_dir=tmp_path / "last")
    a, b = load_file(whole / "model.safetensors"), load_file(last / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = [torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True) for run in (whole, last)]
    assert ckpt[0]["finetune"] == ckpt[1]["finetune"] and ckpt[0]["epoch"] == 2
    states = [c["optimizer_states"][0]["state"] for c in ckpt]
    assert states[0].keys() == states[1].keys() and len(states[0]) > 10
    assert all(torch.equal(states[0][k]["momentum_buffer"], states[1][k]["momentum_buffer"])
               for k in states[0])
    figures = [read_json(run / "metrics.json") for run in (whole, last)]
    assert figures[0]["task"] == figures[1]["task"] == (
        "instance_segmentation" if recipe == "digits_instances" else "detection")
    shared = [k for k in figures[0] if k.startswith(("val/", "best/"))]
    assert "val/map" in shared and ("val/mask_map" in shared) == (recipe == "digits_instances")
    assert {k: figures[1][k] for k in shared} == {k: figures[0][k] for k in shared}
    assert _boxes_by_item(whole / "val_predictions.csv") == _boxes_by_item(
        last / "val_predictions.csv")


@pytest.mark.parametrize("recipe", ["digits_detection", "digits_instances"])
def test_two_process_ddp_trains_a_detector(tmp_path: Path, recipe: str) -> None:
    run = tmp_path / "run"
    tiny = [f"recipe={recipe}", *TINY[1:]]
    result = run_cli(*tiny, *PHASES, "trainer.max_epochs=2", "trainer.strategy=ddp",
                     "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run}",
                     cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["world_size"] == 2
    assert metrics["ddp"] == {"world_size": 2, "frozen_tensors_identical_across_ranks": True,
                              "trained_tensors_identical_across_ranks": True}
    assert result.stdout.count("finetune: done") == 1
    # the frozen classifier is as built; the stage that joined at epoch 1 trained
    weights = load_file(run / "model.safetensors")
    assert "unfreeze at epoch 1: train_from: backbone.body.layer4" in (
        run / "finetune.log").read_text()
    assert any(k.startswith("backbone.body.layer4.") for k in weights)
    # validation was split across the ranks and gathered in the data's order: every image
    # once, each with the boxes the trained detector finds in it alone
    gathered = _boxes_by_item(run / "val_predictions.csv")
    result, _ = evaluate_run(run, output=tmp_path / "eval")
    alone = _boxes_by_item(tmp_path / "eval" / "eval_predictions.csv")
    assert len(gathered) == metrics["val_images"] == 8
    assert gathered == alone
    assert ("val/mask_map" in metrics) == ("mask_map" in result) == (
        recipe == "digits_instances")


def test_frozen_bn_keeps_a_classifier_backbones_statistics_and_reloads(tmp_path: Path) -> None:
    """model.detector.frozen_bn=true under a detector head: the classifier's BatchNorm trains
    nothing — its statistics leave the run as they came, its affine is no parameter — where
    the default (auto: BatchNorm for a classifier) moves them; the run dir rebuilds it."""
    one = [*TINY, "trainer.max_epochs=1", "trainer.limit_val_batches=1"]
    frozen = train_here(*one, "model.detector.frozen_bn=true", run_dir=tmp_path / "frozen")
    plain = train_here(*one, run_dir=tmp_path / "plain")
    stats = {run: {k: v for k, v in load_file(run / "model.safetensors").items()
                   if k.startswith("backbone.body.") and k.endswith("running_mean")}
             for run in (frozen, plain)}
    assert len(stats[frozen]) == len(stats[plain]) == 20
    assert all(not v.any() for v in stats[frozen].values())  # as built: zeros
    assert all(v.any() for v in stats[plain].values())
    counts = [read_json(run / "metrics.json")["trainable_params"] for run in (frozen, plain)]
    assert counts[1] - counts[0] == 2 * 4800  # resnet18's BatchNorm weights and biases
    model = finetune.load(frozen, device="cpu")
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    assert not [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.inference_mode():
        assert set(model([torch.rand(3, 64, 64)])[0]) == {"boxes", "labels", "scores"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped detection split sweep, shrunk to three of its split points."""
    cwd = tmp_path_factory.mktemp("detection_sweep")
    result = run_cli("-m", "recipe=digits_detection_splits", *TINY[1:], "trainer.max_epochs=1",
                     "freeze.train_from=backbone.body.layer4,backbone.fpn,rpn",
                     "hydra.sweep.dir=sweep", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "sweep"


def test_a_split_sweep_ranks_the_detectors_freeze_points_by_val_map(
        sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 3
    trained = {read_json(j / "metrics.json")["train_from"]: read_json(j / "metrics.json")
               for j in jobs}
    assert set(trained) == {"backbone.body.layer4", "backbone.fpn", "rpn"}
    counts = {k: m["trainable_params"] for k, m in trained.items()}
    assert counts["backbone.body.layer4"] > counts["backbone.fpn"] > counts["rpn"]
    rows = ranked_leaderboard(sweep, "val/map", capsys)
    assert "val_map_50" in rows[0] and len(rows) == 3
