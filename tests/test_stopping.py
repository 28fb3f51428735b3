"""Early stopping (trainer.early_stopping): it stops the run, the summary and metrics.json
say why and when, a resumed run stops where the uninterrupted one did, a larger patience
continues one that stopped, and what cannot work is refused at plan time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUICK, problems_here, read_json, train_here
from safetensors.torch import load_file

from finetune.sweeps.leaderboard import COLUMNS, report

# Nothing improves by 10 (val/loss moves by far less): epoch 0 sets the best, each later
# validation counts one; with patience 2 the run stops after epoch 2, whatever the data.
STOP = ["trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=10",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "data.batch_size=16",
        "trainer.enable_progress_bar=false", "sched.epochs=6", "checkpoint.keep=last"]


def test_it_stops_the_run_says_when_and_resumes_consistently(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The run stops after epoch 2 and says so. Epochs 0-1, then a resume to 6: the patience
    counter comes from the checkpoint, so it stops after epoch 2 with the same weights; with
    patience 4 a stopped run trains on."""
    whole = train_here(*QUICK, *STOP, "trainer.max_epochs=6", run_dir=tmp_path / "whole")
    metrics = read_json(whole / "metrics.json")
    assert metrics["status"] == "complete" and metrics["epochs"] == 3
    assert metrics["early_stopping"] == {
        "stopped_epoch": 2, "monitor": "val/loss", "mode": "min", "patience": 2,
        "min_delta": 10.0, "best": metrics["early_stopping"]["best"]}
    assert "stopped early after epoch 2: val/loss did not improve by more than 10 for 2 " \
           "validations" in capsys.readouterr().out
    assert torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    row = report(tmp_path)["rows"][0]  # a sweep's leaderboard records where it stopped
    assert row[COLUMNS.index("stopped_early_at")] == 2 and row[COLUMNS.index("epochs")] == 3
    part = train_here(*QUICK, *STOP, "trainer.max_epochs=2", run_dir=tmp_path / "part")
    assert "early_stopping" not in read_json(part / "metrics.json")
    resumed = train_here(*QUICK, *STOP, "trainer.max_epochs=6", "resume=auto", run_dir=part)
    again = read_json(resumed / "metrics.json")
    assert again["early_stopping"] == metrics["early_stopping"] and again["epochs"] == 3
    wa, wb = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    longer = train_here(*QUICK, *STOP, "trainer.max_epochs=6", "resume=auto",
                        "trainer.early_stopping.patience=4", run_dir=whole)
    assert read_json(longer / "metrics.json")["early_stopping"]["stopped_epoch"] == 4


def test_what_cannot_work_is_refused() -> None:
    assert problems_here(*QUICK, "trainer.early_stopping.patience=2",
                         "trainer.limit_val_batches=0") == [
        "trainer.early_stopping needs validation, and trainer.limit_val_batches=0 runs none: "
        "give validation batches, or patience=null"]
    assert problems_here(*QUICK, "trainer.early_stopping.patience=2",
                         "trainer.early_stopping.monitor=val/acc_top5") == [
        "trainer.early_stopping.monitor=val/acc_top5: top-5 accuracy is not measured with 5 "
        "classes (it would always be 1); use val/acc or val/loss"]
    problems = problems_here(*QUICK, "trainer.early_stopping.patience=0",
                             "trainer.early_stopping.mode=maximal")
    assert len(problems) == 1 and "trainer.early_stopping.mode" in problems[0]
    assert problems_here(*QUICK, "trainer.early_stopping.patience=0") == [
        "trainer.early_stopping.patience=0: must be >= 1 (conf/config.yaml gives each key's "
        "range)"]
