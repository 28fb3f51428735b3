"""Stop and resume: a resumed run ends where the uninterrupted one does (CPU, fixed seed),
after or before its unfreeze epoch, with the same groups, learning rates and optimizer state."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from tests.conftest import problems_here, read_json, train_here

# Every random stream in play: dropout, augmentation, shuffling; momentum, weight decay, a
# phase that joins with its own warm-up, on a schedule that spans the whole run.
RECIPE = [
    "data=fake", "data.image_size=32", "data.fake_size=64", "data.fake_classes=4",
    "data.batch_size=16", "model.name=resnet18", "head.dropout=0.2",
    "data.augment=[RandomHorizontalFlip]", "freeze.train_from=fc",
    "freeze.unfreeze=[{epoch:2,train_from:layer4,lr_mult:0.5,warmup_epochs:1}]",
    "optim.name=sgd", "optim.weight_decay=0.01", "sched.epochs=4",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """whole: 4 epochs at once. Beside it, a chain: `first` stops after epoch 0 (before the
    unfreeze at epoch 2); `middle` resumes it in its own dir (resume=auto) and stops after
    epoch 2 (the unfreeze epoch); `last` resumes that from its run dir into a new one. In
    this process, one run after another (finetune.train); the log of `middle` is kept."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {name: root / name for name in ("whole", "first", "last")}
    train_here(*RECIPE, "trainer.max_epochs=4", run_dir=dirs["whole"])
    train_here(*RECIPE, "trainer.max_epochs=1", run_dir=dirs["first"])
    dirs["middle"] = dirs["first"]
    logger, stream = logging.getLogger("finetune"), io.StringIO()
    handler, level = logging.StreamHandler(stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train_here(*RECIPE, "trainer.max_epochs=3", "resume=auto", run_dir=dirs["middle"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (root / "middle.log").write_text(stream.getvalue())
    train_here(*RECIPE, "trainer.max_epochs=4", f"resume={dirs['middle']}",
               run_dir=dirs["last"])
    return {**dirs, "middle_log": root / "middle.log"}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_resumed_after_the_unfreeze_equals_the_uninterrupted_run(runs: dict[str, Path]) -> None:
    assert _max_diff(_weights(runs["whole"]), _weights(runs["last"])) <= 1e-6
    whole, resumed = _checkpoint(runs["whole"]), _checkpoint(runs["last"])
    assert whole["epoch"] == resumed["epoch"] == 3
    assert whole["finetune"] == resumed["finetune"]
    assert whole["finetune"]["groups"] == ["fc", "fc/no_decay", "layer4", "layer4/no_decay"]
    opt_a, opt_b = whole["optimizer_states"][0], resumed["optimizer_states"][0]
    for a, b in zip(opt_a["param_groups"], opt_b["param_groups"], strict=True):
        assert {k: v for k, v in a.items() if k != "params"} == \
            {k: v for k, v in b.items() if k != "params"}
        assert len(a["params"]) == len(b["params"])
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 4
    for key, state in opt_a["state"].items():
        assert torch.allclose(state["momentum_buffer"], opt_b["state"][key]["momentum_buffer"],
                              atol=1e-6)
    assert whole["lr_schedulers"] == resumed["lr_schedulers"]
    metrics = read_json(runs["last"] / "metrics.json")
    assert metrics["status"] == "complete" and metrics["epochs"] == 4
    assert read_json(runs["last"] / "manifest.json")["resumed_from"] == str(runs["middle"])


def _lr_rows(run: Path) -> dict[int, dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return {int(r["epoch"]): r for r in csv.DictReader(handle) if r.get("lr-fc")}


def test_resumed_before_the_unfreeze_epoch_unfreezes_on_time(runs: dict[str, Path]) -> None:
    log = runs["middle_log"].read_text()
    assert "(epoch 0 done, step 4; 1 freeze stages begun)" in log
    assert "unfreeze at epoch 2: train_from: layer4" in log
    middle = _checkpoint(runs["middle"])
    assert middle["epoch"] == 2 and middle["finetune"]["stages"] == 2
    rows = _lr_rows(runs["last"])
    assert sorted(rows) == [0, 1, 2, 3]  # the history before each stop is kept
    assert [bool(rows[e]["lr-layer4"]) for e in range(4)] == [False, False, True, True]
    assert rows == _lr_rows(runs["whole"])  # the same learning rates, epoch by epoch


def test_resume_problems_are_one_line(runs: dict[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before training: a path that is not there, a checkpoint of another model or
    of another optimizer layout."""
    from omegaconf import OmegaConf

    from finetune.compose.schema import OptimConfig, SchedConfig
    from finetune.errors import FinetuneError
    from finetune.models.heads import replace_heads
    from finetune.training.freezing import plan_freeze
    from finetune.training.lightning_module import FinetuneModule
    from finetune.training.resume import check_resumable, resume_checkpoint

    with pytest.raises(FinetuneError, match=r"resume=nowhere/last\.ckpt: no such file or run dir"):
        resume_checkpoint("nowhere/last.ckpt", tmp_path)
    assert resume_checkpoint("auto", tmp_path) is None  # nothing yet: starts fresh
    assert resume_checkpoint(str(runs["whole"]), tmp_path) == \
        runs["whole"] / "checkpoints" / "last.ckpt"
    checkpoint = runs["whole"] / "checkpoints" / "last.ckpt"
    config = OmegaConf.load(runs["whole"] / ".hydra" / "config.yaml")

    def module(name: str, weight_decay: float) -> FinetuneModule:
        model = torchvision.models.get_model(name)
        replace_heads(model, 4, dropout=0.2)
        plan = plan_freeze(model, "fc", unfreeze=config.freeze.unfreeze)
        optim = OmegaConf.merge(OmegaConf.structured(OptimConfig), config.optim,
                                {"weight_decay": weight_decay})
        return FinetuneModule(model, 4, plan, optim, OmegaConf.structured(SchedConfig))

    header, rows = check_resumable(checkpoint, module("resnet18", 0.01))
    assert "lr-layer4" in header and len(rows) >= 8
    with pytest.raises(FinetuneError, match="the checkpoint is of another model"):
        check_resumable(checkpoint, module("resnet34", 0.01))
    with pytest.raises(FinetuneError, match=r"the optimizer groups differ \(checkpoint: fc, "
                                            r"fc/no_decay, layer4, layer4/no_decay; this config: "
                                            r"fc, layer4\)"):
        check_resumable(checkpoint, module("resnet18", 0.0))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(FinetuneError, match="cannot read the checkpoint"):
        check_resumable(tmp_path / "junk.ckpt", module("resnet18", 0.01))
    monkeypatch.chdir(tmp_path)
    assert problems_here(*RECIPE, "resume=nowhere.ckpt", run_dir=tmp_path / "run") == [
        f"resume=nowhere.ckpt: no such file or run dir (relative paths start at {tmp_path})"]


def test_rerun_reads_the_config_of_a_run_that_never_finished(runs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """A stopped run has no manifest yet: rerun=DIR takes Hydra's .hydra/config.yaml."""
    from hydra import compose, initialize_config_dir

    from finetune import locations
    from finetune.compose.prepare import prepare

    stopped = tmp_path / "stopped"
    (stopped / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml"):
        (stopped / ".hydra" / name).write_bytes((runs["whole"] / ".hydra" / name).read_bytes())
    args = prepare([f"rerun={stopped}", f"resume={runs['whole']}", "trainer.max_epochs=6"])
    with initialize_config_dir(str(locations.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=args)
    assert cfg.freeze.unfreeze[0].train_from == "layer4" and cfg.sched.epochs == 4
    assert cfg.trainer.max_epochs == 6 and cfg.resume == str(runs["whole"])
    assert cfg.data.name == "fake" and cfg.head.dropout == 0.2


def test_resume_says_where_it_stands_and_when_the_schedule_has_ended(
        runs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Extending a finished run past its cosine schedule would train at lr 0: a warning with
    the fix. The log names the epoch and step, and a stop inside an epoch as such."""
    from omegaconf import OmegaConf

    from finetune.compose.schema import OptimConfig, SchedConfig
    from finetune.models.heads import replace_heads
    from finetune.training.freezing import plan_freeze
    from finetune.training.lightning_module import FinetuneModule
    from finetune.training.resume import check_resumable

    config = OmegaConf.load(runs["whole"] / ".hydra" / "config.yaml")
    model = torchvision.models.resnet18()
    replace_heads(model, 4, dropout=0.2)
    module = FinetuneModule(model, 4, plan_freeze(model, "fc", unfreeze=config.freeze.unfreeze),
                            OmegaConf.merge(OmegaConf.structured(OptimConfig), config.optim),
                            OmegaConf.structured(SchedConfig))
    checkpoint = runs["whole"] / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.INFO, logger="finetune"):
        check_resumable(checkpoint, module, max_epochs=4)  # what it was: nothing to say
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        check_resumable(checkpoint, module, max_epochs=6)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "cosine schedule ended with epoch 3" in warned[0]
    assert "epochs 4..5 would train at a learning rate of about 0" in warned[0]
    assert f"weights.source=run weights.path={runs['whole']} trainer.max_epochs=2" in warned[0]
    assert "(epoch 3 done, step " in caplog.text
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    progress["is_last_batch"], progress["current"]["completed"] = False, 2  # a stop mid-epoch
    torch.save(saved, tmp_path / "interrupted.ckpt")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune"):
        check_resumable(tmp_path / "interrupted.ckpt", module, max_epochs=4)
    assert "stopped in epoch 3 after 2 of its batches, step " in caplog.text
