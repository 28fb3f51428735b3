"""k-fold cross-validation: data.folds / data.fold (stratified, seeded, disjoint validation
folds that cover the data), sweep=kfold, and the leaderboard's mean ± std per configuration
across folds."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    QUICK,
    SHRINK,
    problems_here,
    read_json,
    run_cli,
    train_here,
    write_digit_images,
)

from finetune.compose.prepare import compose_with_hydra
from finetune.data.splits import Split, fold_split
from finetune.errors import FinetuneError
from finetune.sweeps.leaderboard import report


def test_folds_are_disjoint_stratified_seeded_and_cover_the_data() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    split = Split(list(range(100)), labels)
    vals = [fold_split(split, 5, i, seed=7)[1] for i in range(5)]
    seen = [set(v.items) for v in vals]
    assert set().union(*seen) == set(range(100)) and sum(map(len, seen)) == 100  # disjoint
    for val in vals:  # every class in proportion: 10, 6 and 4 of each fold
        assert sorted(np.bincount(val.labels).tolist()) == [4, 6, 10]
    train, val = fold_split(split, 5, 2, seed=7)
    assert not set(train.items) & set(val.items) and len(train.items) == 80
    assert fold_split(split, 5, 2, seed=7)[1].items == val.items  # the same for the seed
    assert fold_split(split, 5, 2, seed=8)[1].items != val.items
    with pytest.raises(FinetuneError, match=r"data.fold=5: there are 5 folds"):
        fold_split(split, 5, 5, seed=0)
    with pytest.raises(FinetuneError, match="a class has only 20 images, fewer than the folds"):
        fold_split(split, 25, 0, seed=0)


def test_kfold_is_refused_where_the_data_brings_its_own_val(tmp_path: Path) -> None:
    write_digit_images(tmp_path / "train", [1, 2], 6)
    write_digit_images(tmp_path / "val", [1, 2], 3)
    problems = problems_here(*QUICK, "data=imagefolder", f"data.root={tmp_path}",
                             "data.classes=null", "head.num_classes=null", "data.folds=3")
    assert problems == ["data.folds: this data brings its own validation set (a val/ folder); "
                        "k-fold needs one labelled set: give the folder without train/ and "
                        "val/, or drop data.folds"]


def test_sweep_kfold_runs_every_fold_of_data_folds() -> None:
    """The fold list follows data.folds (data.folds=3 once ran folds 3 and 4 too, which
    failed): one job per fold, 0..K-1, whatever K is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for given, folds in ((None, 5), (2, 2), (3, 3), (10, 10)):
        cfg = compose_with_hydra(["recipe=quickstart", "sweep=kfold",
                                  *([f"data.folds={given}"] if given else [])])
        swept = OverridesParser.create().parse_override(
            f"data.fold={cfg.hydra.sweeper.params['data.fold']}")
        assert cfg.data.folds == folds
        assert list(swept.sweep_iterator()) == list(range(folds)), given


def test_a_sweep_whose_jobs_failed_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    """Fold 5 of 2 cannot run: the sweep goes on, ranks the job that finished, names the one
    that did not and exits 1 (it exited 0)."""
    result = run_cli("-m", "recipe=quickstart", "weights.source=none", "data.folds=2",
                     "data.fold=0,5", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "trainer.enable_progress_bar=false", "eval.report=false", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "finetune: error: 1 of 2 jobs did not finish (1)" in result.stderr, result.stderr
    assert "finetune: sweep done:" in result.stdout
    # plain lines on the terminal; the full format (time, logger, level) in each job's log
    assert re.search(r"^finetune: compose: recipe quickstart -> ", result.stdout, re.M)
    # no progress bar: one line per epoch instead
    assert re.search(r"^finetune: epoch 0 of 1: train/loss [\d.e+-]+, val/loss [\d.e+-]+, "
                     r"val/acc [\d.]+ \([\d.]+ s\)$", result.stdout, re.M), result.stdout
    assert not re.search(r"^\[\d{4}-\d\d-\d\d", result.stdout, re.M), result.stdout[:500]
    log = next(tmp_path.rglob("0/finetune.log")).read_text()
    assert re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[finetune\]\[INFO\] - compose: ", log), log[:300]


def test_the_leaderboard_ranks_configurations_by_their_mean_across_folds(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two split points x 2 folds, each job a real run: one row per split point with the
    mean and sample standard deviation of its folds' val/acc, best first."""
    sweep = tmp_path / "sweep"
    jobs = [(t, f) for t in ("layer4", "fc") for f in (0, 1)]
    for n, (train_from, fold) in enumerate(jobs):
        train_here(*QUICK, *SHRINK, "data.folds=2", f"data.fold={fold}",
                   f"freeze.train_from={train_from}", run_dir=sweep / str(n))
    result = report(sweep)
    header, rows = result["folds"]
    assert header == ["rank", "configuration", "jobs", "folds_done", "mean_val/acc",
                      "std_val/acc", "mean ± std"]
    accs = {t: [read_json(sweep / str(n) / "metrics.json")["val/acc"]
                for n, (tf, _) in enumerate(jobs) if tf == t] for t in ("layer4", "fc")}
    expected = sorted(((statistics.mean(v), statistics.stdev(v), t) for t, v in accs.items()),
                      key=lambda e: (-round(e[0], 4), f"freeze.train_from={e[2]}"))
    assert [(r[1], r[2], r[3]) for r in rows] == [(f"freeze.train_from={t}", 2, 2)
                                                   for _, _, t in expected]
    assert [r[4] for r in rows] == [round(m, 4) for m, _, _ in expected]
    assert [r[5] for r in rows] == [round(s, 4) for _, s, _ in expected]
    assert (sweep / "leaderboard_folds.csv").is_file()
    assert "## By configuration, across folds (val/acc)" in (sweep / "leaderboard.md").read_text()
