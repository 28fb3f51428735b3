"""Using a run dir: finetune.load / predict, export with parity, rerun, tensors only."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import finetune
from finetune.commands.export import export
from finetune.errors import FinetuneError
from tests.conftest import (
    QUICK,
    SHRINK,
    main_here,
    read_json,
    run_console,
    train_here,
    write_digit_images,
)

# A surgery recipe in overrides: a 1x1 conv inserted after layer4, the classifier renamed.
SURGERY = ("surgery=[{op: insert_after, path: layer4, module: {type: Conv2d, out_channels: 512, "
           "kernel_size: 1}}, {op: rename, path: fc, to: fclass}]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(cwd, image folder, run dir) of a short run with surgery on PNGs with a val/ folder."""
    cwd = tmp_path_factory.mktemp("use")
    images = cwd / "images"
    write_digit_images(images / "train", [3, 7, 8], 20)
    write_digit_images(images / "val", [3, 7, 8], 10)
    run = train_here(*QUICK, "data=imagefolder", f"data.root={images}", "data.classes=null",
                     "head.num_classes=null", SURGERY, *SHRINK, "trainer.max_epochs=2",
                     "trainer.limit_val_batches=1.0", run_dir=cwd / "outputs" / "run")
    return cwd, images, run


def _val_predictions(run: Path) -> dict[str, str]:
    with open(run / "val_predictions.csv", newline="") as handle:
        return {row["item"]: row["predicted"] for row in csv.DictReader(handle)}


def test_load_rebuilds_the_surgery_model(trained: tuple[Path, Path, Path]) -> None:
    _, _, run = trained
    model = finetune.load(run)
    assert not model.training
    assert model.class_names == ["3", "7", "8"]
    assert isinstance(model.layer4[1], torch.nn.Conv2d) and hasattr(model, "fclass")
    saved = load_file(str(run / "model.safetensors"))
    assert sorted(model.state_dict()) == sorted(saved)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_predict_equals_the_training_validation(trained: tuple[Path, Path, Path]) -> None:
    """The true CLI (the `finetune predict` console script), as README shows it."""
    cwd, images, run = trained
    result = run_console("predict", f"run={run}", f"input={images / 'val'}", "output=preds.csv",
                         "topk=2", cwd=cwd)
    assert result.returncode == 0, result.stderr
    with open(cwd / "preds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label1", "prob1", "label2", "prob2"]
    expected = _val_predictions(run)
    assert len(rows) == len(expected) == 30
    assert {str(Path(r["path"]).resolve()): r["label1"] for r in rows} == expected
    correct = sum(Path(r["path"]).parent.name == r["label1"] for r in rows)
    assert correct / len(rows) == pytest.approx(read_json(run / "metrics.json")["val/acc"],
                                                abs=1e-6)
    assert all(float(r["prob1"]) >= float(r["prob2"]) for r in rows)


def test_unreadable_images_are_listed_and_skipped(trained: tuple[Path, Path, Path],
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, images, run = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((images / "val" / "7").glob("*.png"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    code, out, err = main_here("predict", f"run={run}", f"input={folder}",
                               f"output={tmp_path / 'p.csv'}", capsys=capsys)
    assert code == 0, err
    assert "skipped unreadable image" in err and "broken.png" in err
    assert "3 images" in out and "1 unreadable" in out
    api = finetune.predict(run, folder, topk=1)
    assert len(api.rows) == 3 and [Path(p).name for p, _ in api.unreadable] == ["broken.png"]
    # an image over the limit is listed like an undecodable one (16x16 = 256 pixels)
    code, out, err = main_here("predict", f"run={run}", f"input={folder}",
                               f"output={tmp_path / 'q.csv'}", "max_pixels=255", capsys=capsys)
    assert code == 2 and err.count("256 pixels, over the limit of 255") == 3, err
    assert f"error: input={folder}: none of its 4 images could be read" in err
    assert not (tmp_path / "q.csv").exists()
    code, _, err = main_here("predict", f"run={run}", f"input={folder}",
                             "max_pixels=256", f"output={tmp_path}", capsys=capsys)
    assert (code, err) == (2, f"finetune predict: error: output={tmp_path}: is a folder; give a "
                              f"file name, e.g. output={tmp_path / 'predictions.csv'}\n")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_with_parity(trained: tuple[Path, Path, Path], tmp_path: Path, fmt: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    if fmt == "onnx" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the onnx extra is not installed")
    _, _, run = trained
    target = tmp_path / f"model.{fmt}"
    code, out, err = main_here("export", f"run={run}", f"format={fmt}",
                               f"output={target}", capsys=capsys)
    assert code == 0, err[-2000:]
    assert "max abs difference" in out
    assert "[torch.onnx]" not in out + err  # the exporter's progress lines are not ours
    info = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert info["class_names"] == ["3", "7", "8"] and info["preprocessing"]["crop"] == 32
    resize = info["preprocessing"]["resize"]
    assert f"resize so that the shorter side is {resize} px" in info["preprocessing_steps"][1]
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        assert info["parity_max_abs_diff"] is None
    else:
        assert info["parity_max_abs_diff"] <= 1e-4
    if fmt == "onnx":  # one portable file: it runs from anywhere, alone
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            moved = tmp_path / "elsewhere" / "m.onnx"
            moved.parent.mkdir()
            target.rename(moved)
            session = onnxruntime.InferenceSession(str(moved),
                                                   providers=["CPUExecutionProvider"])
            x = torch.randn(2, 3, 32, 32)
            with torch.inference_mode():
                expected = finetune.load(run, device="cpu")(x)
            got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
            assert (got - expected).abs().max() <= 1e-4
    if fmt == "torchscript":
        scripted = torch.jit.load(str(target))
        model = finetune.load(run)
        x = torch.randn(4, 3, 32, 32)
        with torch.inference_mode():
            assert (scripted(x) - model(x)).abs().max() <= 1e-4


def test_feature_extractor_exports_too(tmp_path: Path) -> None:
    run = train_here(*QUICK, "head=none", 'surgery=[{op: truncate, path: "", keep: ":8"}]',
                     run_dir=tmp_path / "run")
    assert read_json(run / "manifest.json")["output_shape"] == [512, 1, 1]
    info = export(run, "torchscript")
    assert info["output_shape"] == ["batch", 512, 1, 1] and info["parity_max_abs_diff"] == 0.0
    with pytest.raises(FinetuneError, match="feature extractor"):
        finetune.predict(run, [Path("x.png")])


def test_rerun_reproduces_the_run_exactly(trained: tuple[Path, Path, Path]) -> None:
    cwd, _, run = trained
    again = train_here(f"rerun={run}", run_dir=cwd / "outputs" / "again")
    first, second = read_json(run / "metrics.json"), read_json(again / "metrics.json")
    for key in ("val/acc", "val/loss", "val/f1", "epochs"):
        assert first[key] == second[key], key
    manifest = read_json(again / "manifest.json")
    assert manifest["model_sha256"] == read_json(run / "manifest.json")["model_sha256"]
    assert manifest["recipe"]["rerun_of"] == str(run.resolve())


def test_a_pickled_model_object_is_refused_with_how_to_convert(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from finetune.compose.schema import WeightsConfig
    from finetune.weights.loading import load_weights

    path = tmp_path / "whole_model.pth"
    torch.save(torchvision.models.resnet18(), path)  # the pickled object, not a state dict
    cfg = OmegaConf.structured(WeightsConfig(source="file", path=str(path)))
    with pytest.raises(FinetuneError, match=r"convert it to a state dict once, in a trusted "
                                            r"place: torch\.save\(torch\.load\(path, "
                                            r"weights_only=False\)\.state_dict\(\)"):
        load_weights(torchvision.models.resnet18(), cfg, "resnet18", ["fc"])


def test_a_changed_run_dir_is_refused(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil

    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with open(copy / "model.safetensors", "r+b") as handle:  # flip one byte of a tensor
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(FinetuneError, match="does not match the sha256 in its manifest"):
        finetune.load(copy)


def _received_copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "received"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def test_export_and_predict_never_write_through_a_planted_link(
        trained: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A received run dir may hold links named like our outputs (model.torchscript.pt ->
    ~/.bashrc): the export and predictions refuse them and the link's target is untouched."""
    _, images, run = trained
    copy = _received_copy(run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (copy / "model.torchscript.pt").symlink_to(victim)
    with pytest.raises(FinetuneError, match=r"model\.torchscript\.pt is a symbolic link"):
        export(copy, "torchscript")
    (copy / "model.torchscript.pt").unlink()
    (copy / "model.torchscript.pt.json").symlink_to(victim)  # the JSON beside it, too
    with pytest.raises(FinetuneError, match=r"model\.torchscript\.pt\.json is a symbolic link"):
        export(copy, "torchscript")
    assert victim.read_text() == "keep me"
    assert not [p for p in copy.iterdir() if p.name.startswith(".model.")], "no staging left"
    (copy / "preds.csv").symlink_to(victim)
    code, _, err = main_here("predict", f"run={copy}", f"input={images / 'val'}",
                             f"output={copy / 'preds.csv'}", capsys=capsys)
    assert code == 2 and "is a symbolic link" in err, err
    assert victim.read_text() == "keep me"


def test_a_received_manifest_passes_the_gate(trained: tuple[Path, Path, Path],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """What predict and export rebuild from a manifest (builder arguments, surgery) is gated
    like a recipe; a manifest that is not JSON is one sentence."""
    from finetune.rundir.artifacts import file_sha256

    _, images, run = trained
    copy = _received_copy(run, tmp_path)
    manifest = read_json(copy / "manifest.json")
    assert manifest["model_sha256"] == file_sha256(copy / "model.safetensors")
    manifest["surgery"][0]["module"]["type"] = "os.system"
    manifest["model"]["build_kwargs"] = {"weights": "IMAGENET1K_V1"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FinetuneError) as refused:
        finetune.load(copy)
    assert [p.split(": ", 2)[1] for p in refused.value.problems] == [
        "model.kwargs.weights", "surgery[0].module.type"]
    (copy / "manifest.json").write_text(json.dumps(manifest)[:100])  # truncated
    code, _, err = main_here("predict", f"run={copy}", f"input={images / 'val'}",
                             capsys=capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"finetune predict: error: manifest {copy / 'manifest.json'}: not valid JSON "
        + err.split("not valid JSON ", 1)[1].strip()]


def test_train_runs_in_process_and_predict_stays_a_function(tmp_path: Path) -> None:
    """finetune.train: the run a CLI command makes, in this process (no subprocess), in the
    dir asked for; finetune.predict is the API function, and no module of that name can
    shadow it (the command is finetune/commands/predict.py)."""
    import importlib.util

    assert importlib.util.find_spec("finetune.predict") is None and callable(finetune.predict)
    result = finetune.train("quickstart", ["weights.source=none", *SHRINK],
                            run_dir=tmp_path / "run")
    assert result.run_dir == (tmp_path / "run").resolve()
    assert result.metrics["status"] == "complete" and result.value == result.metrics["val/acc"]
    manifest = read_json(result.run_dir / "manifest.json")
    assert manifest["recipe"]["name"] == "quickstart"
    assert manifest["overrides"] == ["recipe=quickstart", "weights.source=none", *SHRINK]
    images = tmp_path / "images"
    write_digit_images(images, [5], 2)
    predictions = finetune.predict(result.run_dir, images, topk=2)
    assert len(predictions.rows) == 2 and predictions.classes == [str(d) for d in range(5, 10)]
    with pytest.raises(FinetuneError, match=r"head\.num_classes=3 but the data has 5 classes"):
        finetune.train("quickstart", ["weights.source=none", "head.num_classes=3", *SHRINK],
                       run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists(), "refused before it trained: no run dir left"


def test_export_output_may_name_a_folder(tmp_path: Path) -> None:
    """`export output=X` writes X when X names a file, and model.<format> inside X when X is a
    folder: one that exists, one written with a trailing /, or a name without a suffix."""
    from finetune.rundir.exporting import export_target

    run, there = tmp_path / "run", tmp_path / "exports"
    there.mkdir()
    assert export_target(run, "onnx", None) == run / "model.onnx"
    assert export_target(run, "onnx", str(there)) == there / "model.onnx"
    assert export_target(run, "torchscript", f"{tmp_path}/new/") == tmp_path / "new" / \
        "model.torchscript.pt"
    assert export_target(run, "onnx", str(tmp_path / "deploy")) == tmp_path / "deploy" / \
        "model.onnx"
    assert export_target(run, "onnx", str(tmp_path / "mine.onnx")) == tmp_path / "mine.onnx"


@pytest.mark.parametrize("tta", ["none", "flip", "crops", "flip+crops"])
def test_test_time_augmentation_averages_the_logits_of_every_view(
        trained: tuple[Path, Path, Path], tta: str) -> None:
    """predict tta=: each image's logits averaged over its views (the mirror; the four corners
    and the centre of the resized image), computed here by hand from torchvision's functions."""
    import dataclasses

    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from finetune.data.transforms import eval_transform

    _, images, run = trained
    model = finetune.load(run)
    # a margin around the crop, as ImageNet's 256 -> 224 (this run's digits are resized to
    # about the crop, where the five crops would be almost one)
    prep = dataclasses.replace(model.preprocessing, resize=model.preprocessing.crop + 16)
    object.__setattr__(model, "preprocessing", prep)
    object.__setattr__(model, "transform", eval_transform(prep))
    paths = sorted((images / "val").rglob("*.png"))[:6]
    got = finetune.predict(model, paths, topk=3, tta=tta)
    for path, row in zip(paths, got.rows, strict=True):
        resized = F.resize(F.to_image(Image.open(path).convert("RGB")), [prep.resize],
                           antialias=True)
        views = list(F.five_crop(resized, [prep.crop])) if "crops" in tta else [
            F.center_crop(resized, [prep.crop])]
        views += [F.horizontal_flip(v) for v in views] if "flip" in tta else []
        batch = torch.stack([F.normalize(F.to_dtype(v, torch.float32, scale=True), prep.mean,
                                         prep.std) for v in views])
        with torch.inference_mode():
            probs = torch.softmax(model(batch).mean(0), 0)
        top = probs.topk(3)
        assert row["labels"] == [model.class_names[i] for i in top.indices.tolist()]
        assert row["probs"] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_evaluate_with_tta_records_it_and_refuses_what_cannot_hold(
        trained: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, _, run = trained
    code, out, err = main_here("evaluate", f"run={run}", "tta=flip+crops",
                               f"output={tmp_path}", capsys=capsys)
    assert code == 0, err
    result = read_json(tmp_path / "eval.json")
    assert result["tta"] == "flip+crops" and result["images"] == 30
    assert "val split (tta=flip+crops), 30 images: acc " in out
    code, _, err = main_here("evaluate", f"run={run}", "tta=mirror", f"output={tmp_path}",
                             capsys=capsys)
    assert (code, err) == (2, "finetune evaluate: error: tta='mirror' is not one of none, flip, "
                              "crops, flip+crops\n")
    code, _, err = main_here("evaluate", f"run={run}", "tta=flip", "calibrate=true",
                             f"output={tmp_path}", capsys=capsys)
    assert code == 2 and "calibrate=true with tta=flip: the temperature is fitted for" in err


@pytest.mark.parametrize("given", ["min_score=0.5", "draw=drawn"])
def test_box_options_of_predict_are_refused_for_a_classifier(
        trained: tuple[Path, Path, Path], tmp_path: Path, given: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, images, run = trained
    code, _, err = main_here("predict", f"run={run}", f"input={images / 'val'}",
                             f"output={tmp_path / 'p.csv'}", given, capsys=capsys)
    assert code == 2 and "only for a detection run's boxes" in err, err
    assert not (tmp_path / "p.csv").exists()
