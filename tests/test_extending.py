"""docs/extending.md holds: a new data format, schedule, BatchNorm policy or logger is one
class and one table entry, and the whole run (choices, validation, the plan) follows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from finetune.compose.prepare import compose_config
from finetune.data.formats import FORMATS, DataFormat
from finetune.errors import ConfigError
from finetune.training.bn_policies import BN_POLICIES, BNPolicy
from finetune.training.freezing import plan_freeze
from finetune.training.loggers import LOGGERS, RunLogger
from finetune.training.optim import Schedule
from finetune.training.plan import plan_run
from finetune.training.schedules import SCHEDULES, LRShape


class Stripes(DataFormat):
    """Two classes of 12 in-memory images each: vertical or horizontal stripes."""

    name = "stripes"

    def read(self, cfg: Any, crop: int, seed: int) -> tuple[Any, Any, list[str]]:
        from finetune.data.splits import Split

        line = (torch.arange(crop) % 4 < 2).to(torch.uint8) * 255
        vertical = line.expand(crop, crop)
        images = torch.stack([vertical, vertical.t()] * 12)[:, None].expand(-1, 3, -1, -1)
        return Split(images.contiguous(), [0, 1] * 12), None, ["vertical", "horizontal"]


def test_a_new_data_format_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"data\.name='stripes' is not one of"):
        compose_config(["recipe=quickstart", "data.name=stripes"])
    monkeypatch.setitem(FORMATS, "stripes", Stripes())
    cfg, _ = compose_config(["recipe=quickstart", "weights.source=none", "data.name=stripes",
                             "data.val_fraction=0.25", "head.num_classes=null"])
    plan = plan_run(cfg, load=False)
    assert plan.problems == []
    assert plan.class_names == ["vertical", "horizontal"]
    assert plan.data is not None
    assert (len(plan.data.train_set), len(plan.data.val_set)) == (18, 6)
    assert plan.built is not None and plan.built.output_shape == [2]


class Linear(LRShape):
    name = "linear"

    def factor(self, s: Any, t: float) -> float:
        return max(0.0, 1.0 - t / (s.epochs - s.warmup))


def test_a_new_schedule_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCHEDULES, "linear", Linear())
    cfg, _ = compose_config(["recipe=quickstart", "sched.name=linear"])
    assert cfg.sched.name == "linear"
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": 0.4}])
    schedule = Schedule(optimizer, "linear", epochs=4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_a_new_bn_policy_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy no shipped one is: frozen BatchNorm trains its affine and its statistics."""
    monkeypatch.setitem(BN_POLICIES, "open", BNPolicy("open", True, False, "all of BN trains"))
    cfg, _ = compose_config(["recipe=quickstart", "freeze.bn=open"])
    plan = plan_freeze(torchvision.models.resnet18(), "layer4", cfg.freeze.bn)
    assert "layer1.0.bn1.weight" in plan.trainable and "layer1.0.conv1.weight" not in \
        plan.trainable
    assert plan.eval_modules == []
    shipped = plan_freeze(torchvision.models.resnet18(), "layer4", "affine")
    assert "layer1.0.bn1.weight" in shipped.trainable and "layer1.0.bn1" in shipped.eval_modules


class Missing(RunLogger):
    name = "elsewhere"
    package = "finetune_no_such_package"


def test_a_new_logger_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LOGGERS, "elsewhere", Missing())
    cfg, _ = compose_config(["recipe=quickstart", "weights.source=none",
                             "logger.name=elsewhere"])
    assert plan_run(cfg, load=False).problems == [
        "logger=elsewhere needs the finetune_no_such_package package: pip install "
        "'finetune[elsewhere]'"]


def test_every_format_knows_its_classes_without_reading_images(tmp_path: Path) -> None:
    """What the early, torch-free class-count check sees: the same class names the reader
    finds."""
    from omegaconf import OmegaConf

    from finetune.data.readers import read_csv_list, scan_folder
    from tests.conftest import write_digit_images

    files = write_digit_images(tmp_path / "folder" / "train", [3, 7], 2)
    write_digit_images(tmp_path / "folder" / "val", [3, 7], 1)
    (tmp_path / "folder" / ".hidden").mkdir()
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{d}" for d, paths in files.items()
                             for p in paths]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    folder = OmegaConf.create({"root": str(tmp_path / "folder"), "classes": None})
    listed = OmegaConf.create({"root": str(tmp_path / "list.csv"), "classes": None})
    assert FORMATS["imagefolder"].class_names(folder) == scan_folder(
        tmp_path / "folder" / "train", None)[1] == ["3", "7"]
    assert FORMATS["csv"].class_names(listed) == read_csv_list(tmp_path / "list.csv",
                                                               None)[2] == ["3", "7"]
    assert FORMATS["digits"].class_names(OmegaConf.create({"classes": None})) == [
        str(d) for d in range(10)]
    assert FORMATS["imagefolder"].class_names(
        OmegaConf.create({"root": str(tmp_path / "nowhere"), "classes": None})) is None
