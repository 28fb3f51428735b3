"""task=multilabel: label sets from a CSV (a;b;c) or the digits' properties, a sigmoid per
label and BCE-with-logits, mAP / F1 / exact match, thresholds tuned on validation and kept in
the manifest, predict returning label sets; what it does not take is refused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import (
    QUICK,
    SHRINK,
    main_here,
    problems_here,
    read_json,
    train_here,
    write_digit_images,
)

import finetune
from finetune.commands.export import export
from finetune.data.readers import read_multilabel_csv
from finetune.data.splits import Split, fold_split
from finetune.errors import FinetuneError
from finetune.tasks.multilabel import tune_thresholds

PROPERTIES = {d: [n for n, hit in (("even", d % 2 == 0), ("over_4", d > 4),
                                   ("prime", d in (2, 3, 5, 7))) if hit] for d in range(10)}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PNG digits 1, 4, 7, 8 and a CSV of their properties (1 has none: an empty cell)."""
    root = tmp_path_factory.mktemp("multilabel")
    written = write_digit_images(root / "imgs", [1, 4, 7, 8], 12)
    rows = [f"imgs/{d}/{p.name},{';'.join(PROPERTIES[d])}" for d, ps in written.items()
            for p in ps]
    (root / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    return root


def test_label_sets_are_read_from_a_csv(labelled: Path) -> None:
    split, names = read_multilabel_csv(labelled / "labels.csv")
    assert names == ["even", "over_4", "prime"]
    by_digit = {Path(p).parent.name: label for p, label in zip(split.items, split.labels,
                                                               strict=True)}
    assert by_digit == {"1": (0.0, 0.0, 0.0), "4": (1.0, 0.0, 0.0), "7": (0.0, 1.0, 1.0),
                        "8": (1.0, 1.0, 0.0)}


def test_thresholds_are_the_best_f1_per_label() -> None:
    probs = [[0.9, 0.3], [0.7, 0.35], [0.2, 0.1], [0.4, 0.8]]
    labels = [(1.0, 1.0), (1.0, 1.0), (0.0, 0.0), (0.0, 1.0)]
    thresholds, f1 = tune_thresholds(probs, labels)
    assert f1 == [1.0, 1.0]
    assert 0.4 < thresholds[0] <= 0.7 and 0.1 < thresholds[1] <= 0.3
    assert thresholds[0] == 0.5  # of the perfect ones, the nearest 0.5


def test_a_multilabel_run_predicts_label_sets_at_its_thresholds(
        labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = train_here(*QUICK, *SHRINK, "task=multilabel", "data=csv",
                     f"data.root={labelled / 'labels.csv'}", "data.classes=null",
                     "head.num_classes=null", "trainer.limit_val_batches=1.0",
                     "loss.pos_weight=auto", "metric=val/mAP", run_dir=tmp_path / "run")
    metrics, manifest = read_json(run / "metrics.json"), read_json(run / "manifest.json")
    assert metrics["status"] == "complete" and metrics["task"] == "multilabel"
    assert {"val/mAP", "val/f1", "val/f1_micro", "val/acc"} <= set(metrics)
    # the summary leads with the metric the run was told to watch
    assert f"epochs; val/mAP {metrics['val/mAP']:.4f}; val/acc " in capsys.readouterr().out
    assert manifest["task"] == "multilabel" and set(manifest["thresholds"]) == {
        "even", "over_4", "prime"}
    assert manifest["thresholds"] == metrics["thresholds"]
    positives = manifest["balance"]["class_counts"]  # in the training split
    train = metrics["train_images"]
    assert manifest["balance"]["pos_weight"] == pytest.approx(
        [(train - n) / n for n in positives], rel=1e-5)
    with open(run / "val_predictions.csv", newline="") as handle:
        expected = {row["item"]: row["predicted"] for row in csv.DictReader(handle)}
    predictions = finetune.predict(run, [Path(p) for p in expected])
    assert predictions.task == "multilabel" and len(predictions.rows) == len(expected)
    for row in predictions.rows:
        assert ";".join(row["labels"]) == expected[row["path"]]
        assert len(row["probs"]) == 3
    code, _, err = main_here("predict", f"run={run}", f"input={labelled / 'imgs'}",
                             f"output={tmp_path / 'p.csv'}", capsys=capsys)
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == ["path", "labels", "prob_even", "prob_over_4", "prob_prime"]
    assert len(written) == 48
    info = export(run, "torchscript")  # the exported model, and how to read its outputs
    assert info["task"] == "multilabel" and info["thresholds"] == manifest["thresholds"]
    assert info["parity_max_abs_diff"] <= 1e-4


def test_label_sets_split_into_disjoint_folds() -> None:
    split = Split(list(range(40)), [(float(i % 2), float(i % 3 == 0)) for i in range(40)])
    vals = [set(fold_split(split, 4, i, seed=0)[1].items) for i in range(4)]
    assert set().union(*vals) == set(range(40)) and sum(map(len, vals)) == 40


def test_a_multilabel_run_on_the_digits_with_the_feature_cache(tmp_path: Path) -> None:
    run = train_here(*QUICK, *SHRINK, "task=multilabel", "data.classes=null",
                     "head.num_classes=null", "freeze.train_from=layer4", "freeze.cache=true",
                     "trainer.max_epochs=2", run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["feature_cache"]["status"] != "off"
    assert read_json(run / "manifest.json")["class_names"] == ["even", "over_4", "prime"]


def test_what_multilabel_does_not_take_is_refused() -> None:
    problems = problems_here(*QUICK, "task=multilabel", "loss.class_weights=auto",
                             "data.sampler=balanced", "data.mix.mixup_alpha=0.2")
    assert problems == [
        "loss.class_weights is for one class per image; with task=multilabel weigh each "
        "label's positives with loss.pos_weight (auto or a list)",
        "data.sampler=balanced draws classes equally, which label sets do not have; with "
        "task=multilabel use loss.pos_weight=auto",
        "data.mix (MixUp / CutMix) is not supported with task=multilabel yet: drop it"]
    assert problems_here(*QUICK, "metric=val/mAP") == [
        "metric=val/mAP: mean average precision is measured for task=multilabel only; use "
        "val/acc or val/loss"]
    assert problems_here(*QUICK, "task=multilabel", "data=fake") == [
        "task=multilabel reads label sets from data=csv (path,a;b;c) or data=digits (even / "
        "over_4 / prime), not data=fake"]


def test_a_csv_with_one_label_is_refused(tmp_path: Path) -> None:
    write_digit_images(tmp_path / "imgs", [3], 2)
    (tmp_path / "one.csv").write_text("imgs/3/0.png,cat\nimgs/3/1.png,\n")
    with pytest.raises(FinetuneError, match=r"names 1 label\(s\); multi-label classification "
                                            "needs at least two"):
        read_multilabel_csv(tmp_path / "one.csv")
