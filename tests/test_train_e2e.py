"""End to end through `python -m finetune`: real Hydra, real Lightning, real data and files."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load_file

from finetune.rundir.artifacts import file_sha256
from tests.conftest import (
    QUICK,
    SHRINK,
    problems_here,
    read_json,
    train_here,
)

DIGITS_1_9 = "data.classes=[1,2,3,4,5,6,7,8,9]"
# The quickstart's source recipe, shrunk the same way.
SHRUNK_SOURCE = ("weights.recipe_overrides=[" + ",".join(f'"{o}"' for o in SHRINK) + "]")


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The quickstart recipe, shrunk, run twice with the same seed (the second run reuses the
    source recipe the first one trained)."""
    cwd = tmp_path_factory.mktemp("quickstart")
    dirs = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FINETUNE_HOME", str(cwd / "home"))
        for i in range(2):
            dirs.append(train_here("recipe=quickstart", *SHRINK, "trainer.max_epochs=2",
                                   "checkpoint.keep=auto", SHRUNK_SOURCE,
                                   run_dir=cwd / "outputs" / "quickstart" /
                                   f"run{i}"))
    return dirs


def test_a_source_run_is_reused_only_while_it_matches_its_record(
        quickstart_runs: list[Path], tmp_path: Path) -> None:
    from finetune.weights.readers import (
        SOURCE_RECORD,
        SourceNotTrained,
        _source_verified,
        _train_or_reuse,
    )

    source = next((quickstart_runs[0].parents[2] / "home" / "sources").glob("digits_source-*"))
    key = source.name.rpartition("-")[2]
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    assert _source_verified(copy, key)
    assert not _source_verified(copy, "0" * 12), "another config's key"
    record = read_json(copy / SOURCE_RECORD)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # replaced weights
    assert not _source_verified(copy, key)
    (copy / SOURCE_RECORD).unlink()  # a planted run dir has no record of ours
    shutil.copy(source / "model.safetensors", weights)
    assert not _source_verified(copy, key)
    assert record["model_sha256"] == file_sha256(weights)
    # Where reuse is decided: a verified run is reused, a tampered one is not (train=False:
    # what `inspect` does, so nothing is trained here).
    shutil.copy(source / SOURCE_RECORD, copy / SOURCE_RECORD)
    _train_or_reuse("digits_source", "digits_source", key, copy, [], {}, train=False)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SourceNotTrained):
        _train_or_reuse("digits_source", "digits_source", key, copy, [], {}, train=False)


def test_quickstart_writes_every_artifact(quickstart_runs: list[Path]) -> None:
    run = quickstart_runs[0]
    assert run.is_relative_to(run.parents[2]) and run.parts[-3:-1] == ("outputs", "quickstart")
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete"
    for key in ("val/acc", "val/loss", "val/f1", "epochs", "train_seconds",
                "train_images_per_second", "best/val/acc", "best/epoch"):
        assert metrics[key] is not None, key
    assert metrics["epochs"] == 2 and 0.0 <= metrics["val/acc"] <= 1.0
    assert metrics["train_images_per_second"] > 0 and metrics["world_size"] == 1
    assert 0.0 <= metrics["input_wait_share"] < 1.0
    assert metrics["first_step_seconds"] > 0

    report = read_json(run / "load_report.json")
    # Trained in finetune's own cache, never under the working directory's outputs/, where a
    # folder someone sent could hold a planted "source run".
    sources = list((run.parents[2] / "home" / "sources").glob("digits_source-*"))
    assert len(sources) == 1, "the source recipe is trained once and reused"
    assert not (run.parents[1] / "sources").exists()
    assert report["source"] == "recipe" and report["run"]["dir"] == str(sources[0].resolve())
    assert report["counts"]["loaded"] == 120 and report["missing"] == ["fc.weight", "fc.bias"]
    assert "the head starts new" in report["head_reset"]
    source_weights = load_file(str(sources[0] / "model.safetensors"))

    manifest = read_json(run / "manifest.json")
    assert manifest["class_names"] == [str(d) for d in range(5, 10)]
    assert manifest["recipe"]["name"] == "quickstart"
    assert manifest["recipe"]["sha256"] == file_sha256(Path(manifest["recipe"]["file"]))
    assert manifest["model"]["name"] == "resnet18" and manifest["head"]["paths"] == ["fc"]
    assert manifest["preprocessing"]["crop"] == 32
    assert set(manifest["versions"]) >= {"torch", "torchvision", "pytorch-lightning",
                                         "hydra-core", "omegaconf"}
    assert manifest["model_sha256"] == file_sha256(run / "model.safetensors")
    assert manifest["seed"] == 0

    tensors = load_file(str(run / "model.safetensors"))
    assert tensors["fc.weight"].shape == (5, 512)
    trained_key = "layer4.1.conv2.weight"
    assert not torch.equal(tensors[trained_key], source_weights[trained_key])
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(last["state_dict"]["model.fc.weight"], tensors["fc.weight"])
    assert not (run / "checkpoints" / "best.ckpt").exists(), "checkpoint.keep=auto: last only"

    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"val/acc", "val/loss", "train/loss_epoch"} <= set(rows[0])
    assert {row["epoch"] for row in rows if row["val/acc"]} == {"0", "1"}
    for picture in ("curves.png", "confusion_matrix.png"):
        with Image.open(run / picture) as image:
            assert image.format == "PNG" and image.size[0] > 200
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())[0] == \
        "recipe=quickstart"


def test_a_real_lightning_checkpoint_loads_bit_identical(quickstart_runs: list[Path]) -> None:
    from omegaconf import OmegaConf

    from finetune.compose.schema import WeightsConfig
    from finetune.weights.loading import load_weights

    run = quickstart_runs[0]
    model = torchvision.models.resnet18(num_classes=5)
    cfg = OmegaConf.structured(WeightsConfig(source="file",
                                             path=str(run / "checkpoints" / "last.ckpt")))
    report = load_weights(model, cfg, "resnet18", ["fc"])
    assert report.container == "state_dict" and report.missing == [] and not report.unexpected
    saved = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_run_dir_is_a_weight_source(quickstart_runs: list[Path], tmp_path: Path) -> None:
    run = quickstart_runs[0]
    done = train_here(*QUICK, "weights.source=run", f"weights.path={run}", *SHRINK,
                      run_dir=tmp_path / "run")
    report = read_json(done / "load_report.json")
    # Same classes (5-9) as the source run: its head is a valid start and loads too.
    assert report["source"] == "run" and report["counts"]["loaded"] == 122
    assert report["head_reset"] is None and report["run"]["recipe"] == "quickstart"


def test_a_new_head_is_not_the_sources_head_again(quickstart_runs: list[Path]) -> None:
    """The source (digits 0-4) was trained from scratch with the quickstart's seed; the
    quickstart's head for 5-9 starts new, not from the draw the source's head started from
    (which its short training hardly moved: correlation 0.97 when both came from the global
    stream, and a head-only fine-tune that learned half as fast)."""
    from finetune.compose.prepare import compose_config
    from finetune.training.plan import plan_run

    source = next((quickstart_runs[0].parents[2] / "home" / "sources").glob("digits_source-*"))
    cfg, _ = compose_config(["recipe=quickstart", *SHRINK, "weights.source=run",
                             f"weights.path={source}"])
    plan = plan_run(cfg)
    plan.raise_problems()
    assert plan.built is not None and plan.built.report.head_reset
    new = plan.built.model.fc.weight.detach().flatten()
    old = load_file(source / "model.safetensors")["fc.weight"].flatten()
    assert abs(float(torch.corrcoef(torch.stack([new, old]))[0, 1])) < 0.3


def test_same_recipe_and_seed_give_the_same_run(quickstart_runs: list[Path]) -> None:
    first, second = (read_json(run / "metrics.json") for run in quickstart_runs)
    for key in ("val/acc", "val/loss", "val/f1"):
        assert first[key] == second[key], key
    first_w, second_w = (load_file(str(run / "model.safetensors")) for run in quickstart_runs)
    assert all(torch.equal(first_w[k], second_w[k]) for k in first_w)
    # what else decides the last bits of the figures on a CPU is recorded beside them
    assert (first["threads"], first["cpu_capability"]) == (
        torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())


def test_resnet50_9cls_through_torchvision_cache(torch_home: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with caplog.at_level(logging.INFO, logger="finetune"):
        run = train_here("recipe=resnet50_9cls", "data=digits", DIGITS_1_9,
                         "data.image_size=32", *SHRINK, run_dir=tmp_path / "run")
    report = read_json(run / "load_report.json")
    assert report["source"] == "torchvision"
    assert report["path"].startswith(str(torch_home))
    assert report["url"].endswith("resnet50-11ad3fa6.pth")
    assert [s["key"] for s in report["shape_skipped"]] == ["fc.weight", "fc.bias"]
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["counts"]["loaded"] == 318
    assert "loaded 318/320 tensors from torchvision; new: fc.weight, fc.bias" in caplog.text

    checkpoint = torch.load(report["path"], weights_only=True)
    trained = load_file(str(run / "model.safetensors"))
    frozen_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.")
    for key, value in trained.items():
        if key.startswith(frozen_prefixes):  # weights and BatchNorm statistics alike
            assert torch.equal(value, checkpoint[key]), f"{key} changed while frozen"
    assert not torch.equal(trained["layer4.2.conv3.weight"], checkpoint["layer4.2.conv3.weight"])
    assert not torch.equal(trained["layer3.0.bn1.running_mean"],
                           checkpoint["layer3.0.bn1.running_mean"])
    assert trained["fc.weight"].shape == (9, 2048)
    manifest = read_json(run / "manifest.json")
    assert manifest["class_names"] == [str(d) for d in range(1, 10)]
    assert manifest["weights"]["sha256"] == report["sha256"] == file_sha256(Path(report["path"]))
    assert manifest["preprocessing"]["resize"] == round(32 * 232 / 224)


def test_imagefolder_of_pngs_with_tensorboard(digits_folder: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Real PNG folders, two files among them that do not decode: skipped and listed."""
    root = tmp_path / "imgs"
    shutil.copytree(digits_folder, root)
    good = next((root / "1").glob("*.png"))
    (root / "1" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "2" / "notes.png").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="finetune"):
        run = train_here(*QUICK, "data=imagefolder", f"data.root={root}", "data.classes=null",
                         "head.num_classes=null", "logger=tensorboard", *SHRINK,
                         run_dir=tmp_path / "run")
    assert read_json(run / "manifest.json")["class_names"] == ["0", "1", "2"]
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["bad_images"] == 2
    listed = (run / "bad_images.csv").read_text().splitlines()
    assert listed[0] == "path,reason" and len(listed) == 3
    assert "skipped 2 images that cannot be decoded" in caplog.text
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_weights_and_biases_logs_offline_into_the_run_dir(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """logger=wandb: the run's figures in RUN_DIR/wandb, offline (nothing leaves the machine
    unless WANDB_MODE=online is set where the command runs), its summary the final metrics."""
    pytest.importorskip("wandb")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = train_here(*QUICK, *SHRINK, "trainer.max_epochs=2", "logger=wandb",
                     run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    [record] = (run / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads

    summary = wandb_summary(record)
    assert summary["val/acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert summary["best/epoch"] == metrics["best/epoch"]
    assert summary["train_images"] == metrics["train_images"]


def wandb_summary(path: Path) -> dict[str, object]:
    """The summary a W&B record file holds (what `wandb sync` uploads): its LevelDB-style log
    read block by block (32 KiB blocks, a 7-byte header per record piece; a record may span
    blocks), each record parsed with wandb's own protobuf, the last value of each key kept."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", data[:8]
    found: dict[str, object] = {}
    pos, pending = header, b""  # the file's own 7-byte header opens the first block
    while pos + header <= len(data):
        if block - pos % block < header:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        piece, pos = data[pos + header:pos + header + length], pos + header + length
        pending = piece if kind in (1, 2) else pending + piece  # full/first, middle/last
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                found[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return found


def test_googlenet_trains_with_its_auxiliary_heads(tmp_path: Path) -> None:
    run = train_here(*QUICK, "model.name=googlenet", "+model.kwargs.aux_logits=true",
                     "data.image_size=64", *SHRINK, "trainer.limit_train_batches=1",
                     "trainer.limit_val_batches=1", "data.batch_size=4", run_dir=tmp_path / "run")
    assert read_json(run / "manifest.json")["head"]["paths"] == ["fc", "aux1.fc2", "aux2.fc2"]
    assert load_file(str(run / "model.safetensors"))["aux2.fc2.weight"].shape == (5, 1024)


def test_too_small_input_for_inception_aux_head_says_what_to_do(tmp_path: Path) -> None:
    problems = problems_here(*QUICK, "model.name=inception_v3", "data.image_size=80",
                             *SHRINK, "trainer.limit_train_batches=1", "data.batch_size=2",
                             run_dir=tmp_path / "run")
    assert len(problems) == 1 and "inception_v3 cannot take 80 px inputs" in problems[0]
    assert "model.kwargs.aux_logits=false" in problems[0]


def test_offline_weights_error_names_url_and_path(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    empty_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(empty_home))
    error = problems_here("recipe=resnet50_9cls", "data=digits", DIGITS_1_9,
                          "data.image_size=32", *SHRINK, run_dir=tmp_path / "run")
    assert len(error) == 1
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in error[0]
    assert str(empty_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in error[0]
    assert not (tmp_path / "run").exists(), "refused before it trained: no run dir left"


def test_a_wrong_class_count_and_missing_weights_are_reported_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    problems = problems_here("recipe=resnet50_9cls", "data=digits", DIGITS_1_9,
                             "data.image_size=32", "head.num_classes=4", *SHRINK,
                             run_dir=tmp_path / "run")
    assert len(problems) == 2, problems
    assert problems[0].startswith("head.num_classes=4 but the data has 9 classes")
    assert "resnet50-11ad3fa6.pth is not cached" in problems[1]
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in problems[1]


def test_run_time_problems_are_reported_together(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    errors = problems_here(*QUICK, "model.name=resnet5", "data=imagefolder",
                           "data.root=no/such/folder", "weights.source=file",
                           run_dir=tmp_path / "run")
    assert len(errors) == 3, errors
    assert "did you mean 'resnet50'" in errors[0]
    assert "weights.source=file needs weights.path" in errors[1]
    assert "data.root='no/such/folder': no such path" in errors[2]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None,
                    reason="mlflow is installed here; the message is for when it is not")
def test_missing_logger_package_says_how_to_install(tmp_path: Path) -> None:
    assert problems_here(*QUICK, "logger=mlflow", *SHRINK, run_dir=tmp_path / "run") == [
        "logger=mlflow needs the mlflow package: pip install 'finetune[mlflow]'"]


def test_a_home_path_works_as_in_a_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         ) -> None:
    """`data.root=~/photos`: Hydra's grammar alone stops at the `~`; the home is expanded."""
    from finetune.compose.prepare import compose_config
    from finetune.training.plan import plan_run
    from tests.conftest import write_digit_images

    monkeypatch.setenv("HOME", str(tmp_path))
    write_digit_images(tmp_path / "photos", [1, 2], 6)
    cfg, _ = compose_config(["recipe=quickstart", "weights.source=none", "data=imagefolder",
                             "data.root=~/photos", "data.classes=null", "head.num_classes=null"])
    assert cfg.data.root == str(tmp_path / "photos")
    assert plan_run(cfg, load=False).problems == []
    assert problems_here(*QUICK, "data=imagefolder", "data.root=~/elsewhere",
                         run_dir=tmp_path / "run") == [
        f"data.root='{tmp_path / 'elsewhere'}': no such path (relative paths start at "
        f"{Path.cwd()})"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without")
def test_a_gpu_asked_for_where_there_is_none_is_one_sentence(tmp_path: Path) -> None:
    problems = problems_here(*QUICK, "trainer.accelerator=gpu", "trainer.precision=16-mixed",
                             run_dir=tmp_path / "run")
    assert len(problems) == 1 and problems[0].startswith("trainer.accelerator=gpu: ")
    assert "use trainer.accelerator=auto" in problems[0]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_output_is_finetunes_own_unless_debug(level: str, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """The third-party lines that say nothing about the run (training/quiet.py) are filtered;
    log_level=debug keeps them, and the caller's warning filters are untouched after."""
    import warnings

    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        train_here(*QUICK, *SHRINK, "freeze.train_from=layer4", "trainer.log_every_n_steps=50",
                   f"log_level={level}", run_dir=tmp_path / "run")
        warnings.warn("the caller's own warning", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in seen]
    noise = ["exists and is not empty", "module(s) in eval mode",
             "smaller than the logging interval"]
    lightning = [r.getMessage() for r in caplog.records if r.name.startswith("pytorch_lightning")]
    ours = [r.getMessage() for r in caplog.records if r.name == "finetune"]
    assert any(m.startswith("trainer: cpu, 1 device(s)") for m in ours)
    assert any("frozen BatchNorm layers stay in eval mode on purpose" in m for m in ours)
    assert "the caller's own warning" in messages
    if level == "info":
        assert not [m for m in messages if any(n in m for n in noise)], messages
        assert not any("GPU available" in m for m in lightning), lightning
    else:
        assert all(any(n in m for m in messages) for n in noise), messages
        assert any("GPU available" in m for m in lightning), lightning


def test_one_off_library_lines_are_filtered_for_the_run_only(
        caplog: pytest.LogCaptureFixture) -> None:
    """matplotlib's font-cache line and Lightning's "dirpath has changed" on a resume into a
    new run dir are filtered while a run runs, and come back after it."""
    import warnings

    from finetune.training.quiet import quiet_output

    font = "Matplotlib is building the font cache; this may take a moment."
    dirpath = "The dirpath has changed from '/a/checkpoints' to '/b/checkpoints', therefore"

    def said() -> tuple[list[str], list[str]]:
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            caplog.clear()
            with quiet_output("info"):
                logging.getLogger("matplotlib.font_manager").warning(font)
                warnings.warn(dirpath, UserWarning, stacklevel=1)
            inside = [r.getMessage() for r in caplog.records] + [str(w.message) for w in seen]
            caplog.clear()
            seen.clear()
            logging.getLogger("matplotlib.font_manager").warning(font)
            warnings.warn(dirpath, UserWarning, stacklevel=1)
            return inside, [r.getMessage() for r in caplog.records] + [str(w.message)
                                                                      for w in seen]

    inside, after = said()
    assert inside == [] and after == [font, dirpath]


def test_the_checkpoint_policy_keeps_what_it_says(tmp_path: Path) -> None:
    """checkpoint.keep and checkpoint.optimizer: best.ckpt holds weights only, identical
    files are stored once, a weights-only checkpoint is refused as a resume in one line."""
    from finetune.training.run import checkpoints_kept

    assert (checkpoints_kept("auto", sweep=False), checkpoints_kept("auto", sweep=True)) == (
        "last", "none")
    both = train_here(*QUICK, *SHRINK, "checkpoint.keep=both", "checkpoint.optimizer=false",
                      run_dir=tmp_path / "both")
    best, last = both / "checkpoints" / "best.ckpt", both / "checkpoints" / "last.ckpt"
    assert best.samefile(last), "one epoch: the same weights, stored once"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in saved and "model.fc.weight" in saved["state_dict"]
    assert problems_here(*QUICK, *SHRINK, f"resume={both}", run_dir=tmp_path / "again") == [
        f"resume={last}: the checkpoint holds weights only (best.ckpt, or "
        "checkpoint.optimizer=false), not the optimizer and schedule a resume continues; start "
        f"a new run from its weights instead (weights.source=file weights.path={last})"]
    none = train_here(*QUICK, *SHRINK, "checkpoint.keep=none", run_dir=tmp_path / "none")
    assert not list(none.rglob("*.ckpt")) and (none / "model.safetensors").is_file()
    only_best = train_here(*QUICK, *SHRINK, "trainer.max_epochs=2", "checkpoint.keep=best",
                           run_dir=tmp_path / "best")
    kept = sorted(p.name for p in (only_best / "checkpoints").iterdir())
    assert kept == ["best.ckpt"]
    assert "optimizer_states" not in torch.load(only_best / "checkpoints" / "best.ckpt",
                                                map_location="cpu", weights_only=True)


def test_top_k_keeps_the_k_best_epochs_by_the_runs_metric(tmp_path: Path) -> None:
    """checkpoint.keep=topK (timm's checkpoint history): the K epochs with the best `metric`
    (val/loss here: lower is better), weights only, and last.ckpt to resume from;
    metrics.json lists them best first."""
    from finetune.rundir.artifacts import epoch_metrics
    from finetune.training.run import best_epochs_kept, checkpoint_monitor

    assert [best_epochs_kept(k) for k in ("auto", "last", "none", "best", "both", "top2",
                                            "top10")] == [0, 0, 0, 1, 1, 2, 10]
    assert [checkpoint_monitor(m) for m in ("val/acc", "best/val/acc", "val/loss", "val/f1")] \
        == [("val/acc", "max"), ("val/acc", "max"), ("val/loss", "min"), ("val/f1", "max")]
    run = train_here(*QUICK, *SHRINK, "trainer.max_epochs=4", "trainer.limit_train_batches=1",
                     "checkpoint.keep=top2", "metric=val/loss", run_dir=tmp_path / "top")
    losses = epoch_metrics(run / "metrics.csv")["val/loss"]
    best_two = sorted(losses, key=lambda epoch: losses[epoch])[:2]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == sorted([*(f"top-epoch{e}.ckpt" for e in best_two), "last.ckpt"])
    ranked = read_json(run / "metrics.json")["ranked_checkpoints"]
    assert [r["file"] for r in ranked] == [f"checkpoints/top-epoch{e}.ckpt" for e in best_two]
    assert [r["val/loss"] for r in ranked] == pytest.approx([losses[e] for e in best_two],
                                                            abs=1e-5)
    top = torch.load(run / "checkpoints" / f"top-epoch{best_two[0]}.ckpt", map_location="cpu",
                     weights_only=True)
    assert "optimizer_states" not in top and "optimizer_states" in torch.load(
        run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_a_resume_into_a_new_run_dir_says_what_its_best_checkpoints_rank(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Lightning's "dirpath has changed" becomes our own line: the best checkpoints kept in
    the new dir rank the epochs trained there; the earlier ones stay where they are."""
    import warnings

    first = train_here(*QUICK, *SHRINK, "trainer.limit_train_batches=1",
                       "checkpoint.keep=both", run_dir=tmp_path / "first")
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        again = train_here(*QUICK, *SHRINK, "trainer.limit_train_batches=1",
                           "trainer.max_epochs=2", "checkpoint.keep=both", f"resume={first}",
                           run_dir=tmp_path / "again")
    assert read_json(again / "metrics.json")["status"] == "complete"
    assert (f"resume: the best checkpoints kept here rank the epochs trained in this run dir; "
            f"those of the earlier epochs stay in {first / 'checkpoints'}") in caplog.text
    assert not [w for w in seen if "dirpath has changed" in str(w.message)]


def test_a_refused_run_removes_only_its_own_bookkeeping(tmp_path: Path) -> None:
    """A run dir that held anything else keeps all of it (and says failed); a fresh one
    is gone."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.log").write_text("the user's")
    assert problems_here(*QUICK, *SHRINK, "head.num_classes=3", run_dir=mine)
    assert (mine / "notes.log").read_text() == "the user's"
    assert read_json(mine / "metrics.json")["status"] == "failed"
    assert problems_here(*QUICK, *SHRINK, "head.num_classes=3", run_dir=tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
