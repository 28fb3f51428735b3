"""A model that learned nothing is flagged, never just "done": one class predicted, accuracy at
chance, a loss that exploded or did not fall — in the summary, metrics.json, the report's
headline and the leaderboard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finetune.rundir.verdict import learning_warnings, short
from tests.conftest import QUICK, main_here, read_json, train_here

NAMES = ["cat", "dog", "fox"]


def _labels(warnings: list[str]) -> list[str]:
    return [w.split(":")[0] for w in warnings]


def test_each_sign_on_its_own_and_none_for_a_model_that_learned() -> None:
    learned = [[8, 1, 1], [1, 8, 1], [0, 2, 8]]
    falling = {"train/loss_epoch": {0: 1.2, 1: 0.7, 2: 0.4}}
    assert learning_warnings(learned, NAMES, 0.6, falling) == []
    one_class = [[0, 10, 0], [0, 10, 0], [0, 10, 0]]
    assert _labels(learning_warnings(one_class, NAMES, 1.0, falling)) == [
        "one class predicted", "at chance"]
    assert "called 'dog'" in learning_warnings(one_class, NAMES, 1.0, falling)[0]
    # imbalanced: always answering the big class is 0.8; a model at 0.8 learned nothing more
    majority = [[8, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert _labels(learning_warnings(majority, NAMES, 1.0, falling)) == [
        "one class predicted", "at chance"]
    spread_but_chance = [[2, 4, 4], [4, 2, 4], [4, 4, 2]]  # every class predicted, acc 0.2
    assert _labels(learning_warnings(spread_but_chance, NAMES, 1.0, falling)) == ["at chance"]
    uniform = math.log(3)
    for loss, exploded in ((2 * uniform - 0.01, False), (2 * uniform + 0.01, True),
                           (46.0, True), (math.inf, True), (math.nan, True)):
        assert ("loss exploded" in _labels(learning_warnings(learned, NAMES, loss, falling))
                ) == exploded, loss
    for series, flat in (({0: 1.0, 1: 1.0}, True), ({0: 1.0, 1: 1.3}, True),
                         ({0: 1.0, 1: 0.99}, False), ({0: 1.0}, False), ({}, False)):
        found = learning_warnings(learned, NAMES, 0.6, {"train/loss_epoch": series})
        assert ("loss not falling" in _labels(found)) == flat, series
    assert learning_warnings(None, NAMES, None, {}) == []  # no validation ran: nothing to say
    assert short(["one class predicted: x", "at chance: y"]) == "one class predicted; at chance"
    assert short(None) == "" and short([3, "loss exploded: z"]) == "loss exploded"


def test_a_run_that_learned_nothing_says_so_everywhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """optim.lr=1000 on the digits: every image called one class at chance, the loss blown
    up: the status stays complete (it ran), and every place a person looks says so."""
    sweep = tmp_path / "sweep"
    capsys.readouterr()
    run = train_here(*QUICK, "optim.lr=1000", "trainer.max_epochs=2",
                     "trainer.limit_train_batches=3", run_dir=sweep / "0")
    out = capsys.readouterr().out
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete"
    labels = _labels(metrics["warnings"])
    assert {"one class predicted", "at chance", "loss exploded"} <= set(labels), labels
    for warning in metrics["warnings"]:
        assert f"  warning: {warning}" in out
    page = (run / "report.html").read_text()
    assert page.index('id="warnings"') < page.index("<section")  # the headline, first
    assert main_here("report", str(sweep), capsys=capsys)[0] == 0
    board = (sweep / "leaderboard.csv").read_text()
    assert "one class predicted; at chance; loss exploded" in board
