"""Bad input and bad luck, each with one message and nothing lost: images that do not decode,
a loss that becomes NaN, Ctrl-C, a full disk; and the same seed giving the same run twice."""

from __future__ import annotations

import csv
import errno
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from conftest import (
    QUICK,
    SHRINK,
    problems_here,
    read_json,
    train_here,
    write_digit_images,
)
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from finetune.compose.schema import DataConfig, OptimConfig, SchedConfig
from finetune.data.datamodule import ImageDataModule, TensorImages, build_datamodule
from finetune.data.readers import fake_data
from finetune.data.transforms import eval_transform
from finetune.errors import FinetuneError
from finetune.models import heads
from finetune.models.backbones import preprocessing
from finetune.rundir import artifacts
from finetune.training.callbacks import AtomicCheckpointIO
from finetune.training.freezing import apply_freeze, plan_freeze
from finetune.training.guards import NonFiniteLoss
from finetune.training.lightning_module import FinetuneModule

warnings.filterwarnings("ignore")
CLASSES = 4


@pytest.fixture
def folder_with_bad_images(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    write_digit_images(root, [0, 1, 2], per_class=10)
    good = next((root / "1").glob("*.png"))
    (root / "1" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "2" / "notes.png").write_text("not an image")
    return root


def _data_cfg(root: Path, policy: str = "skip") -> DataConfig:
    return OmegaConf.structured(DataConfig(name="imagefolder", root=str(root), image_size=32,
                                           batch_size=8, num_workers=0, on_bad_image=policy))


def test_undecodable_images_are_skipped_and_listed(folder_with_bad_images: Path) -> None:
    data = build_datamodule(_data_cfg(folder_with_bad_images), preprocessing(None, 32), 0)
    assert sorted(Path(p).name for p, _ in data.bad_images) == ["notes.png", "truncated.png"]
    assert all(reason for _, reason in data.bad_images)
    used = {Path(p).name for p in [*data.train_set.paths, *data.val_set.paths]}
    assert len(used) == 30 and not used & {"notes.png", "truncated.png"}


def test_undecodable_images_stop_the_run_when_asked(folder_with_bad_images: Path) -> None:
    with pytest.raises(FinetuneError) as refused:
        build_datamodule(_data_cfg(folder_with_bad_images, "error"), preprocessing(None, 32), 0)
    message = str(refused.value)
    assert message.startswith("data: 2 images cannot be decoded, e.g. ")
    assert message.endswith("fix or remove them, or set data.on_bad_image=skip to train "
                            "without them")
    for path in (folder_with_bad_images / "2").glob("*.png"):
        if path.name != "notes.png":
            path.unlink()
    with pytest.raises(FinetuneError, match="no image of class 2 can be decoded"):
        build_datamodule(_data_cfg(folder_with_bad_images), preprocessing(None, 32), 0)


def _module_and_data(lr: float = 0.05) -> tuple[FinetuneModule, ImageDataModule]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    heads.replace_heads(model, CLASSES)
    plan = plan_freeze(model, "layer4")
    apply_freeze(model, plan)
    split, names = fake_data(64, CLASSES, 32, seed=0)
    transform = eval_transform(preprocessing(None, 32))
    data = ImageDataModule(TensorImages(split.items[:48], split.labels[:48], transform),
                           TensorImages(split.items[48:], split.labels[48:], transform),
                           names, batch_size=16, num_workers=0)
    optim = OmegaConf.merge(OmegaConf.structured(OptimConfig), {"name": "sgd", "lr": lr})
    return FinetuneModule(model, CLASSES, plan, optim, OmegaConf.structured(SchedConfig())), data


class _Diverge(pl.Callback):
    """The weights blow up at a chosen step, as a too-high learning rate makes them."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.fc.weight.fill_(float("nan"))


def test_a_nan_loss_stops_before_it_is_saved(tmp_path: Path) -> None:
    module, data = _module_and_data()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=50, callbacks=[checkpoints, _Diverge(step=4)],
                         plugins=[AtomicCheckpointIO()])
    with pytest.raises(NonFiniteLoss) as stopped:
        trainer.fit(module, datamodule=data)
    assert str(stopped.value) == (
        f"the training loss became nan at step 4 (epoch 1); training stopped before saving "
        f"anything of it: the last good checkpoint is {tmp_path / 'last.ckpt'} (epoch 0), "
        f"resumable with resume={tmp_path / 'last.ckpt'}; lower optim.lr, set "
        "trainer.gradient_clip_val, or check the data")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved["finetune"]["stages"] == 1
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values()
               if t.is_floating_point())


@pytest.mark.parametrize(("stop", "name"), [(signal.SIGINT, "Ctrl-C"),
                                            (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_and_sigterm_save_a_resumable_checkpoint(tmp_path: Path, stop: signal.Signals,
                                                        name: str) -> None:
    """SIGTERM (a scheduler's stop, `kill`) ends a run as Ctrl-C does: never exit 0 with the
    status left `running`."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", "recipe=base", "data=fake", "data.fake_size=200",
         "data.fake_classes=4", "data.batch_size=16", "data.image_size=32",
         "trainer.max_epochs=500",
         "trainer.enable_progress_bar=false", "freeze.train_from=layer4", "freeze.cache=false",
         "hydra.run.dir=run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # into the next epoch
    proc.send_signal(stop)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    metrics = read_json(tmp_path / "run" / "metrics.json")
    saved = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    assert metrics["status"] == "interrupted" and metrics["checkpoint"] == str(saved.resolve())
    assert f"finetune: stopped by {name} in epoch " in out and f"resume={saved.resolve()}" in out
    run_dir = saved.resolve().parent.parent
    assert f"python -m finetune rerun={run_dir} resume={saved.resolve()}" in out
    assert f"python -m finetune rerun={run_dir} resume={run_dir} " in out
    checkpoint = torch.load(saved, weights_only=True)  # what resume= reads, and checks
    assert checkpoint["finetune"]["stages"] == 1 and checkpoint["global_step"] > 0
    assert not list(saved.parent.glob(".*"))  # no temporary left


def test_a_full_disk_leaves_the_previous_file_whole(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing an artifact or a checkpoint (the OS call raises it, as on a full
    device): one message, the old file intact, no temporary file left."""
    metrics, checkpoint = tmp_path / "metrics.json", tmp_path / "last.ckpt"
    artifacts.write_json(metrics, {"status": "running"})
    AtomicCheckpointIO().save_checkpoint({"epoch": 0}, checkpoint)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(artifacts.DiskFull) as stopped:
        artifacts.write_json(metrics, {"status": "complete"})
    assert str(stopped.value) == (
        f"no space left on the device while writing {metrics}; the previous file is intact; "
        "free some space (or point hydra.run.dir elsewhere) and run again (resume=RUN_DIR "
        "continues a run from its last checkpoint)")
    with pytest.raises(artifacts.DiskFull):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1}, checkpoint)
    monkeypatch.undo()
    assert read_json(metrics) == {"status": "running"}
    assert torch.load(checkpoint, weights_only=True) == {"epoch": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "metrics.json"]


def test_deterministic_runs_repeat_exactly() -> None:
    """trainer.deterministic=true and a seed: the same metrics and weights twice on CPU."""
    results = []
    for _ in range(2):
        pl.seed_everything(0, workers=True, verbose=False)
        module, data = _module_and_data()
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, deterministic=True,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=data)
        results.append(({k: float(v) for k, v in trainer.callback_metrics.items()},
                        module.model.state_dict()))
    (metrics_a, weights_a), (metrics_b, weights_b) = results
    assert metrics_a == metrics_b and "val/loss" in metrics_a
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_traceback_only_when_asked(tmp_path: Path) -> None:
    """HYDRA_FULL_ERROR=1 adds the traceback behind a user error (without it, one line and
    exit 2: every cli_errors() check in the suite)."""
    loud = subprocess.run([sys.executable, "-m", "finetune", "recipe=base", "data=imagefolder",
                           "data.root=nowhere"], cwd=tmp_path,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
    assert ("finetune: error: data.root='nowhere': no such path (relative paths start at "
            f"{tmp_path})") in loud.stderr


def test_two_runs_never_share_a_run_dir(tmp_path: Path) -> None:
    """Run dirs started in the same second differ by a suffix; and a dir another live run
    holds is refused in one sentence, leaving that run's files alone."""
    from finetune.compose.prepare import compose_with_hydra

    dirs = {str(compose_with_hydra(["recipe=quickstart"]).hydra.run.dir) for _ in range(2)}
    assert len(dirs) == 2 and all(d.startswith("outputs/quickstart/") for d in dirs)
    # the suffix itself (two composes may straddle a second, differing without it)
    assert all(re.fullmatch(r"outputs/quickstart/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{4}", d)
               for d in dirs), dirs
    held = tmp_path / "run"
    lock = artifacts.lock_run_dir(held)
    try:
        artifacts.write_json(held / "metrics.json", {"status": "running"})
        with pytest.raises(FinetuneError, match="another run is writing to"):
            artifacts.lock_run_dir(held)
        assert problems_here(*QUICK, *SHRINK, run_dir=held) == [
            f"another run is writing to {held} right now; wait for it to end, or give this "
            "one its own dir (hydra.run.dir=...)"]
        assert read_json(held / "metrics.json") == {"status": "running"}
    finally:
        lock.close()
    artifacts.lock_run_dir(held).close()  # free again once the holder ends


def test_ctrl_c_during_a_write_takes_effect_once_the_file_is_whole(tmp_path: Path) -> None:
    """Ctrl-C that lands while a checkpoint is written (it did, in CI) no longer cuts the
    file short with a traceback: the write finishes, then the interrupt is raised."""
    target = tmp_path / "last.ckpt"

    def writer(handle: Any) -> None:
        handle.write(b"a" * 10)
        signal.raise_signal(signal.SIGINT)
        handle.write(b"b" * 10)

    with pytest.raises(KeyboardInterrupt):
        artifacts.write_stream(target, writer)
    assert target.read_bytes() == b"a" * 10 + b"b" * 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(("args", "expected"), [
    (["data.augment=[{Resize: {size: -4}}]"],
     "data.augment[0] ({'Resize': {'size': -4}}): fails on a 32 px training image: Input and "
     "output sizes should be greater than 0, but got input (H: 32, W: 32) output (H: -4, W: "
     "-4); fix its arguments or remove it"),
    (["trainer.check_val_every_n_epoch=2"],  # found by the property test: no validation
     "trainer.check_val_every_n_epoch=2 but the run has 1 epoch(s): it would never validate "
     "(no metrics, nothing to rank); lower it, or set trainer.limit_val_batches=0 to train "
     "without validation on purpose"),
    (["surgery=[{op: rename, path: fc, to: training}]"],
     "surgery[0] (rename fc): to='training' is already an attribute of ResNet of the model; "
     "choose a name it does not have"),
], ids=["negative-resize", "never-validates", "rename-onto-training"])
def test_mistakes_that_crashed_in_training_are_refused_by_the_plan(args: list[str],
                                                                   expected: str) -> None:
    """They passed `recipes validate` and ended in a traceback in the first batch (or in
    model.eval()); now the plan refuses them, before anything trains."""
    assert problems_here(*QUICK, *SHRINK, *args) == [expected]


def test_a_single_class_folder_is_refused_before_the_model_is_built(tmp_path: Path) -> None:
    write_digit_images(tmp_path / "one", [3], per_class=6)
    expected = [f"data: only one class (3) in {tmp_path / 'one'}; a classifier needs at least "
                "two: add a folder of other images (for a yes/no model, one of negatives) or "
                "list more in data.classes"]
    for num_classes in ("head.num_classes=5", "head.num_classes=null"):  # precheck, then data
        assert problems_here(*QUICK, *SHRINK, "data=imagefolder", f"data.root={tmp_path / 'one'}",
                             "data.classes=null", num_classes) == expected


def test_non_finite_weights_are_refused_before_training(tmp_path: Path) -> None:
    """NaN in a BatchNorm buffer (or anywhere) of the weights gave a `complete` run with a
    NaN val/loss; now it is one sentence at plan time, naming the tensors."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.bn1.running_var"][3] = float("nan")
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    assert problems_here(*QUICK, *SHRINK, "weights.source=file", f"weights.path={path}",
                         run_dir=tmp_path / "run") == [
        "weights: 2 of the 120 loaded tensors hold NaN or infinity, e.g. "
        f"layer1.0.bn1.running_var, layer2.0.conv1.weight ({path}); the file is damaged or "
        "comes from a run that diverged: use another, or leave them out with weights.exclude"]
    assert not (tmp_path / "run").exists()


def test_a_nan_loss_at_the_first_step_does_not_blame_the_learning_rate(tmp_path: Path) -> None:
    module, data = _module_and_data()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=False, callbacks=[_Diverge(step=0)])
    with pytest.raises(NonFiniteLoss) as stopped:
        trainer.fit(module, datamodule=data)
    assert str(stopped.value).startswith(
        "the training loss was nan at the first step (0), before any update, so not because "
        "of the learning rate: the model's weights or the input images hold non-finite values")


def test_non_finite_final_metrics_are_a_failed_run_in_valid_json(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that is finite while it trains and NaN in eval mode: metrics.json is strict
    JSON (NaN written as null), its status says failed and why; never `complete`."""
    import json

    monkeypatch.setenv("FINETUNE_ALLOW_MODULES", "tests.user_layers")
    run = tmp_path / "run"
    with pytest.raises(FinetuneError) as stopped:
        train_here(*QUICK, *SHRINK, "surgery=[{op: insert_after, path: fc, module: "
                   "{type: tests.user_layers.NanInEval}}]", run_dir=run)
    assert str(stopped.value).startswith("the final validation metrics are not finite "
                                         "(val/loss=nan")

    def refuse(constant: str) -> None:
        raise AssertionError(f"metrics.json holds a bare {constant}: not JSON")

    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["status"] == "failed" and metrics["val/loss"] is None
    assert metrics["error"] == [str(stopped.value)] and metrics["epochs"] == 1
    assert (run / "model.safetensors").is_file()  # kept for a look


def test_a_full_disk_while_a_checkpoint_saves_ends_the_run_in_one_sentence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while epoch 1's last.ckpt is written (the OS call raises ENOSPC, as on
    a full device): one sentence, epoch 0's checkpoint whole and resumable, metrics.json
    failed with the reason, no temporary file."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if Path(name).name.startswith(".last.ckpt.") and last.is_file():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(artifacts.DiskFull) as stopped:
        train_here(*QUICK, *SHRINK, "trainer.max_epochs=2", "checkpoint.keep=last", run_dir=run)
    assert str(stopped.value).startswith(
        f"no space left on the device while writing {last}; the previous file is intact; ")
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert read_json(run / "metrics.json") == {"status": "failed",
                                               "error": [str(stopped.value)]}
    assert not [p for p in run.rglob(".*") if p.name != ".hydra" and ".hydra" not in p.parts
                and p.name != ".lock"]


def test_one_image_per_batch_where_batchnorm_sees_one_value_is_refused() -> None:
    """Found by the property test (tests/test_property.py): resnet18 at 32 px ends in 1x1
    maps, where a training BatchNorm cannot take a batch of one; it crashed in the first
    step. Frozen, those layers keep their statistics, and the run is fine."""
    assert problems_here(*QUICK, *SHRINK, "data.batch_size=1") == [
        "data.batch_size=1: the BatchNorm layer layer4.0.bn1 (and 4 more) trains on one value "
        "per channel at 32 px, which it cannot do with one image per batch; use "
        "data.batch_size >= 2, or freeze those layers (frozen BatchNorm keeps its statistics)"]


def test_a_last_batch_of_one_image_is_dropped(tmp_path: Path) -> None:
    """33 training images in batches of 16: the epoch is 2 batches, not 2 and a batch of one
    that BatchNorm cannot train on (it crashed in the last step of the epoch)."""
    run = train_here(*QUICK, "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                     "checkpoint.keep=none", "data.batch_size=16", "data.train_size=33",
                     "trainer.limit_val_batches=1",
                     run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and metrics["train_images"] == 33
    with open(run / "metrics.csv", newline="") as handle:
        steps = {int(row["step"]) for row in csv.DictReader(handle)}
    assert steps == {1}  # logged after the epoch's last step: steps 0 and 1, no step 2


def _enospc(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_never_stops_a_run_for_a_cache(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The decoded-image and feature caches are a saving, not the run: when the device is
    full (the OS call raises ENOSPC) each says so in one line, keeps what it computed in
    memory, and leaves no file, whole or partial."""
    import logging

    from finetune.compose.prepare import compose_config
    from finetune.training.feature_cache import FeatureCache
    from finetune.training.plan import preprocessing_for

    root = tmp_path / "images"
    write_digit_images(root, [0, 1], 6)
    cfg, _ = compose_config(["weights.source=none", "data=imagefolder", f"data.root={root}",
                             "data.image_size=24", "data.decode_cache=true", "seed=7"])
    decoded = Path(os.environ["FINETUNE_HOME"]) / "decoded"
    before = set(decoded.glob("*")) if decoded.is_dir() else set()
    monkeypatch.setattr(os, "fsync", _enospc)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        data = build_datamodule(cfg.data, preprocessing_for(cfg), cfg.seed)
        assert data.train_set.rows is not None  # the decoded images, from memory
        store = FeatureCache(None, tmp_path / "feature_cache")  # type: ignore[arg-type]
        features = torch.ones(4, 3)
        assert store._keep(features, "ab" * 32, "train") is features
    assert (set(decoded.glob("*")) if decoded.is_dir() else set()) == before
    assert not any((tmp_path / "feature_cache").rglob("*.*"))
    said = [r.getMessage() for r in caplog.records if "no space left" in r.getMessage()]
    assert len(said) == 2 and "decoded images" in said[0] and "train features" in said[1], said


def test_a_full_study_database_is_recognised(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full" (a real database capped by max_page_count,
    written through Optuna and SQLAlchemy) and the OS's ENOSPC are both a full disk to the
    sweep, which then stops in one sentence; other errors are not."""
    import optuna
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")

    @event.listens_for(storage.engine, "connect")
    def cap(connection, _record) -> None:  # a database that cannot grow past its pages now
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")

    storage.engine.dispose()
    study = optuna.create_study(storage=storage, study_name="full")
    with pytest.raises(Exception) as full:
        for _ in range(10_000):
            trial = study.ask()
            trial.set_user_attr("padding", "x" * 4000)
    assert artifacts.is_disk_full(full.value), repr(full.value)
    assert artifacts.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not artifacts.is_disk_full(ValueError("a bad value"))
    assert not artifacts.is_disk_full(OSError(errno.EACCES, "Permission denied"))
