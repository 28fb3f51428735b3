"""The evaluation's figures against scikit-learn's on the same predictions, calibration and
temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from finetune.rundir.evaluation import Outputs, fit_temperature, metrics

CLASSES = [f"c{i}" for i in range(7)]


def _outputs(seed: int = 0, n: int = 400, k: int = 7) -> Outputs:
    """Logits that are right more often than not, with a class never predicted (c6 gets
    low logits) to exercise zero-division."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g) * 2
    logits[torch.arange(n), labels] += 2.5
    logits[:, k - 1] -= 9.0  # the last class is never predicted
    return Outputs(logits, labels, [f"#{i}" for i in range(n)])


def test_figures_equal_scikit_learns() -> None:
    out = _outputs()
    result = metrics(out, CLASSES)
    probs = torch.softmax(out.logits, 1).numpy()
    y, p = out.labels.numpy(), probs.argmax(1)
    assert result["acc"] == pytest.approx(accuracy_score(y, p), abs=1e-6)
    assert result["acc_top5"] == pytest.approx(
        top_k_accuracy_score(y, probs, k=5, labels=range(7)), abs=1e-6)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, p, labels=range(7), zero_division=0)
    for row, pr, rc, f, s in zip(result["per_class"], precision, recall, f1, support,
                                 strict=True):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((pr, rc, f),
                                                                             abs=1e-6)
        assert row["support"] == s
    for avg in ("macro", "weighted"):
        pr, rc, f, _ = precision_recall_fscore_support(y, p, labels=range(7), average=avg,
                                                       zero_division=0)
        assert (result[f"{avg}/precision"], result[f"{avg}/recall"], result[f"{avg}/f1"]) == \
            pytest.approx((pr, rc, f), abs=1e-6)
    assert result["confusion"]["counts"] == confusion_matrix(y, p, labels=range(7)).tolist()
    normalized = confusion_matrix(y, p, labels=range(7), normalize="true")
    assert np.allclose(result["confusion"]["normalized"], normalized, atol=1e-6)
    assert result["loss"] == pytest.approx(log_loss(y, probs, labels=range(7)), abs=1e-5)
    assert 6 not in p and result["per_class"][6]["precision"] == 0.0  # 0, not NaN


def test_ece_is_the_weighted_gap_of_the_reliability_bins() -> None:
    """ECE (15 bins) = sum over bins of (share of images) x |accuracy - confidence|, with the
    bins' accuracy and confidence from scikit-learn's calibration_curve on correctness."""
    base = _outputs(1)
    # over- and underconfident rows mixed: the bins' gaps differ in sign, so the binning
    # matters (a model off the same way in every bin has the same ECE at any bin count)
    scale = torch.exp(1.5 * torch.randn(len(base.labels), 1,
                                        generator=torch.Generator().manual_seed(0)))
    out = Outputs(base.logits * scale, base.labels, base.items)
    result = metrics(out, CLASSES)
    assert result["ece"] != pytest.approx(metrics(out, CLASSES, bins=10)["ece"], abs=1e-4)
    probs = torch.softmax(out.logits, 1).numpy()
    confidence, correct = probs.max(1), (probs.argmax(1) == out.labels.numpy())
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15,
                                                  strategy="uniform")
    counts = np.array([r["count"] for r in result["reliability"] if r["count"]])
    expected = float(np.sum(counts / counts.sum() * np.abs(accuracy - mean_confidence)))
    assert result["ece"] == pytest.approx(expected, abs=1e-5)
    shown = [r for r in result["reliability"] if r["count"]]
    assert [r["accuracy"] for r in shown] == pytest.approx(list(accuracy), abs=1e-6)
    assert sum(r["count"] for r in result["reliability"]) == len(out.labels)


def test_temperature_scaling_lowers_nll_and_keeps_the_predictions() -> None:
    """The same model made overconfident (logits x 4) gets 4 times the temperature; the NLL
    drops, the ECE does not rise, and no predicted class changes."""
    base = _outputs(2)
    hot = Outputs(base.logits * 4, base.labels, base.items)
    t = fit_temperature(hot.logits, hot.labels)
    assert t == pytest.approx(4 * fit_temperature(base.logits, base.labels), rel=1e-3)
    before, after = metrics(hot, CLASSES), metrics(hot, CLASSES, temperature=t)
    assert after["loss"] < before["loss"] and after["ece"] <= before["ece"]
    assert after["confusion"]["counts"] == before["confusion"]["counts"]
    nll = [torch.nn.functional.cross_entropy(hot.logits / s, hot.labels).item()
           for s in (t * 0.9, t, t * 1.1)]
    assert nll[1] <= min(nll[0], nll[2])  # a minimum, not just lower


# -- the test split, through the real readers and a real run ---------------------------------

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from finetune.compose.prepare import compose_config  # noqa: E402
from finetune.data.datamodule import build_datamodule  # noqa: E402
from tests.conftest import (  # noqa: E402
    main_here,
    problems_here,
    read_json,
    train_here,
    write_digit_images,
)


def _data(*overrides: str):
    from finetune.training.plan import preprocessing_for

    cfg, _ = compose_config(["weights.source=none", *overrides])
    return build_datamodule(cfg.data, preprocessing_for(cfg), cfg.seed)


def _items(dataset) -> set:
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return {str(p) for p in paths}
    return {bytes(x.numpy()) for x in dataset.images}


def test_test_fraction_is_stratified_seeded_and_disjoint() -> None:
    data = _data("data.test_fraction=0.25", "data.classes=[0,1,2]")
    again = _data("data.test_fraction=0.25", "data.classes=[0,1,2]")
    other = _data("data.test_fraction=0.25", "data.classes=[0,1,2]", "seed=1")
    train, val, test = (data.splits[k] for k in ("train", "val", "test"))
    per_class = np.bincount(train.labels + val.labels + test.labels)
    assert per_class.tolist() == [178, 182, 177]  # the digits 0, 1, 2: every image once
    assert np.all(np.abs(np.bincount(test.labels) - per_class / 4) <= 1)  # stratified
    train_items, val_items, test_items = (_items(d) for d in (
        data.eval_dataset("train"), data.val_set, data.test_set))
    assert not (test_items & train_items) and not (test_items & val_items)
    assert _items(again.test_set) == test_items and _items(other.test_set) != test_items


def test_an_image_folder_with_train_val_test_and_a_test_folder_beside_classes(
        tmp_path: Path) -> None:
    split = tmp_path / "split"
    write_digit_images(split / "train", [0, 1, 2], 12)
    write_digit_images(split / "val", [0, 1, 2], 4, start=12)
    write_digit_images(split / "test", [0, 1], 5, start=16)  # a subset of the classes
    data = _data("data=imagefolder", f"data.root={split}")
    assert data.class_names == ["0", "1", "2"]
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (36, 12, 10)
    assert set(data.test_set.labels) == {0, 1}
    beside = tmp_path / "beside"
    write_digit_images(beside, [0, 1], 10)
    write_digit_images(beside / "test", [0, 1], 3, start=10)
    data = _data("data=imagefolder", f"data.root={beside}")
    assert data.class_names == ["0", "1"] and len(data.test_set) == 6  # 'test' is no class
    write_digit_images(beside / "test", [7], 2)
    assert problems_here("data=imagefolder", f"data.root={beside}", "weights.source=none"
                         ) == [f"data.root: {beside / 'test'} has class folders the training "
                               "data has not (7); every class of a split must be a training "
                               "class (0, 1)"]


def test_a_csv_split_column(tmp_path: Path) -> None:
    images = write_digit_images(tmp_path / "img", [3, 4], 10)
    rows = ["path,label,split"]
    for digit, paths in images.items():
        rows += [f"{p.relative_to(tmp_path)},{digit},{'test' if i < 3 else 'val' if i < 5 else ''}"
                 for i, p in enumerate(paths)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    data = _data("data=csv", f"data.root={tmp_path / 'list.csv'}")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (10, 4, 6)
    (tmp_path / "bad.csv").write_text("path,label,split\nimg/3/x.png,3,holdout\n")
    assert problems_here("data=csv", f"data.root={tmp_path / 'bad.csv'}",
                         "weights.source=none")[0].endswith(
        "a split other than train, val or test on line 2 (fix or remove those rows)")


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with a test split; its best weights kept (checkpoint.keep=both) to compare."""
    return train_here("recipe=quickstart", "weights.source=none", "data.test_fraction=0.2",
                      "trainer.max_epochs=3", "trainer.limit_train_batches=3",
                      "trainer.enable_progress_bar=false", "data.batch_size=16",
                      "checkpoint.keep=both", "eval.checkpoint=best",
                      run_dir=tmp_path_factory.mktemp("tested") / "run")


def test_the_test_split_is_evaluated_with_the_best_weights(tested_run: Path) -> None:
    """eval.checkpoint=best: the test figures are those of the best val/acc epoch's weights
    (the same weights best.ckpt holds), evaluated again here from that file."""
    import finetune
    from finetune.rundir import evaluation

    metrics = read_json(tested_run / "metrics.json")
    assert metrics["test/checkpoint"].startswith("best (epoch ")
    assert {"test/acc", "test/macro/f1", "test/ece", "test/loss"} <= set(metrics)
    model = finetune.load(tested_run, device="cpu")
    best = torch.load(tested_run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in best.items()})
    data = _data("recipe=quickstart", "data.test_fraction=0.2")
    result, _ = evaluation.evaluate(model, data.test_set, model.class_names)
    assert result["acc"] == metrics["test/acc"] and result["ece"] == metrics["test/ece"]
    rows = (tested_run / "test_predictions.csv").read_text().splitlines()
    assert rows[0] == "item,label,predicted,confidence,label_probability"
    assert len(rows) - 1 == metrics["test/images"]
    assert set(read_json(tested_run / "evaluation.json")) == {"val", "test"}


def test_evaluate_calibrates_and_predict_and_export_apply_it(
        tested_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """finetune.evaluate on the run's own test split, then calibrate=true: a temperature
    fitted on val, in the manifest; the test NLL does not rise; predict's probabilities
    are the calibrated ones (same classes); the ONNX export divides by it."""
    import finetune
    from finetune.rundir.exporting import export

    run = tmp_path / "run"
    shutil.copytree(tested_run, run)
    code, out, err = main_here("evaluate", f"run={run}", capsys=capsys)
    assert code == 0, err
    plain = read_json(run / "eval.json")
    assert plain["split"] == "test" and plain["temperature"] == 1.0
    code, out, err = main_here("evaluate", f"run={run}", "calibrate=true",
                               capsys=capsys)
    assert code == 0, err
    calibrated = read_json(run / "eval.json")
    t = calibrated["temperature"]
    assert t != 1.0 and calibrated["calibration"]["fitted_on"] == "val"
    assert calibrated["uncalibrated"]["acc"] == calibrated["acc"] == plain["acc"]
    assert calibrated["loss"] <= plain["loss"] + 1e-3  # fitted on val, measured on test
    manifest = read_json(run / "manifest.json")
    assert manifest["temperature"] == t
    again = finetune.load(run, device="cpu")
    assert again.manifest.temperature == t
    pictures = write_digit_images(tmp_path / "pictures", [5, 9], 2, mode="RGB")
    paths = [p for group in pictures.values() for p in group]
    from finetune.data.images import open_rgb

    with torch.inference_mode():
        logits = again(torch.stack([again.transform(open_rgb(p)) for p in paths]))
    predicted = finetune.predict(again, paths, topk=1)
    expected_top = torch.softmax(logits / t, dim=1).max(dim=1)
    assert [r["probs"][0] for r in predicted.rows] == pytest.approx(
        expected_top.values.tolist(), abs=1e-6)
    assert [r["labels"][0] for r in predicted.rows] == [
        again.class_names[i] for i in expected_top.indices.tolist()]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    info = export(run, "onnx", tmp_path / "model.onnx")
    assert info["temperature"] == t and info["parity_max_abs_diff"] < 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    with torch.inference_mode():
        expected = again(x) / t
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-4)
    assert "temperature" in out
    page = (run / "report.html").read_text()  # rebuilt with what evaluate found
    assert f"<td>test (finetune evaluate, temperature {t:.4f})</td>" in page
    assert f"Calibrated: temperature {t:.4f}, fitted on val" in page


def test_evaluate_other_data_by_class_name(tested_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A folder with a subset of the run's classes (by name), all of it evaluated; a class
    the run does not know is one sentence."""
    folder = tmp_path / "new"
    write_digit_images(folder, [6, 8], 6, mode="RGB")
    code, _, err = main_here("evaluate", f"run={tested_run}", "data=imagefolder",
                             f"data.root={folder}", f"output={tmp_path / 'out'}",
                             capsys=capsys)
    assert code == 0, err
    result = read_json(tmp_path / "out" / "eval.json")
    assert result["split"] == "all" and result["images"] == 12
    assert [r["support"] for r in result["per_class"]] == [0, 6, 0, 6, 0]  # 5..9
    write_digit_images(folder, [1], 2)
    code, _, err = main_here("evaluate", f"run={tested_run}", "data=imagefolder",
                             f"data.root={folder}", f"output={tmp_path / 'out2'}",
                             capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [
        "finetune evaluate: error: data: the class 1 is not among the run's 5 classes (5, 6, "
        "7, 8, 9); leave them out with data.classes=[...], or evaluate a run trained on them"]


def test_a_tampered_temperature_is_refused(tested_run: Path, tmp_path: Path) -> None:
    import finetune
    from finetune.errors import FinetuneError

    run = tmp_path / "run"
    shutil.copytree(tested_run, run)
    manifest = read_json(run / "manifest.json")
    manifest["temperature"] = -1
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FinetuneError, match="temperature is not a number in"):
        finetune.load(run)


@pytest.mark.parametrize("task", ["keypoints", ["multiclass"], "multilabel"])
def test_a_manifests_task_must_be_installed(tested_run: Path, tmp_path: Path,
                                            task: object) -> None:
    """A run dir names its task: one this machine has is used (multilabel then predicts
    label sets), any other value is refused, naming it."""
    import finetune
    from finetune.errors import FinetuneError

    run = tmp_path / "run"
    shutil.copytree(tested_run, run)
    manifest = read_json(run / "manifest.json")
    manifest["task"] = task
    (run / "manifest.json").write_text(json.dumps(manifest))
    if task == "multilabel":
        assert finetune.load(run).manifest.task == "multilabel"
        return
    with pytest.raises(FinetuneError, match=r"the manifest's task .* is not one of multiclass, "
                                            r"multilabel, detection, segmentation, "
                                            r"instance_segmentation \(a task a plugin adds "):
        finetune.load(run)


def test_report_rebuilds_a_run_dirs_page(tested_run: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tested_run, run)
    (run / "report.html").unlink()
    code, _, _ = main_here("report", str(run), capsys=capsys)
    assert code == 0 and (run / "report.html").is_file()
    text = (run / "report.html").read_text()
    images = read_json(run / "metrics.json")["test_images"]
    assert 'id="per-class"' in text and f"test: {images} images" in text


def test_a_temperature_the_fit_cannot_trust_is_refused_and_never_written(
        tested_run: Path) -> None:
    """An over-confident model (its logits scaled by 10^4: wrong answers at confidence 1.0)
    fits a temperature past the range a manifest may hold; calibrate refuses it in one
    sentence and the run dir is untouched. Writer and reader share one rule, on all its cases."""
    import finetune
    from finetune.commands.evaluate import calibrate_on_val, temperature_problem
    from finetune.errors import FinetuneError
    from finetune.rundir.manifest import Manifest

    model = finetune.load(tested_run, device="cpu")
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e4)
        last.bias.mul_(1e4)
    manifest = tested_run / "manifest.json"
    before = manifest.read_bytes()
    with pytest.raises(FinetuneError, match=r"calibrate=true: the fitted temperature \S+ is "
                                            r"outside \[0\.01, 100\] \(val accuracy"):
        calibrate_on_val(model, model.manifest.config["data"], 64)
    assert manifest.read_bytes() == before
    recorded = json.loads(before)
    for t in (0.001, 0.0099, 0.01, 1.0, 99.9, 100.0, 100.01, 134.19, 1e9):
        try:
            Manifest.from_json({**recorded, "temperature": t}, "manifest")
            read = True
        except FinetuneError:
            read = False
        assert read == (temperature_problem(t, 0.5) is None), t
