"""optim.lr=auto: Lightning's learning-rate finder picks the rate before the run trains and
leaves no trace (the run equals one given that rate); groups with their own rate keep it;
where it cannot run it is one sentence; the rule that reads the curve, on every case."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import QUICK, SHRINK, main_here, problems_here, read_json, train_here
from omegaconf import OmegaConf
from safetensors.torch import load_file

from finetune.compose.prepare import compose_config
from finetune.training.lr_finder import lr_problems, suggest


@pytest.mark.parametrize(("lrs", "losses", "expected"), [
    ([1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0, 3.0], 1e-3),  # a valley: a tenth of its floor
    ([1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0, 0.5], 1e-2),  # still falling at the end
    ([1e-4, 1e-3, 1e-2], [1.0, 1.5, 3.0], None),  # never below its first value
    ([1e-4, 1e-3, 1e-2, 1e-1], [math.nan, 2.0, math.nan, 1.0], 1e-2),  # NaN ignored
    ([1e-4], [1.0], None),  # one point: nothing to read
    ([], [], None),
])
def test_the_rate_is_a_tenth_of_where_the_loss_is_lowest(lrs: list[float], losses: list[float],
                                                        expected: float | None) -> None:
    found = suggest(lrs, losses)
    assert found == (pytest.approx(expected) if expected is not None else None)


def test_where_the_finder_cannot_run_it_is_one_sentence() -> None:
    def said(*overrides: str, kind: str = "classifier") -> list[str]:
        cfg, _ = compose_config([*QUICK, *overrides])
        return lr_problems(cfg, kind)

    assert said("optim.lr=0.01") == [] and said("optim.lr=auto") == []
    assert said("optim.lr=fast") == [
        "optim.lr='fast': give a learning rate > 0, e.g. 1.0e-3, or auto (found by Lightning's "
        "learning-rate finder before the run trains)"]
    assert said("optim.lr=[0.1]")[0].startswith("optim.lr='ListConfig': give a learning rate")
    assert said("optim.lr=null")[0].startswith("optim.lr=None: give a learning rate")
    assert said("optim.lr=true")[0].startswith("optim.lr=True: give a learning rate")
    assert said("optim.lr=auto", "trainer.strategy=ddp", "trainer.devices=2")[0].startswith(
        "optim.lr=auto with several processes (DDP)")
    assert said("optim.lr=auto", "trainer.num_nodes=2")[0].startswith(
        "optim.lr=auto with several processes (DDP)")
    assert said("optim.lr=auto", "resume=somewhere")[0].startswith("optim.lr=auto with resume")
    for task in ("detection", "instance_segmentation", "segmentation"):  # named as given
        assert said("optim.lr=auto", f"task={task}", kind="detector")[0].startswith(
            f"optim.lr=auto with task={task}: the learning-rate finder is built")


def test_a_bad_rate_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    problems = problems_here(*QUICK, *SHRINK, "optim.lr=fast", run_dir=tmp_path / "run")
    assert any(p.startswith("optim.lr='fast'") for p in problems)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_found_rate_is_used_and_the_finder_leaves_no_trace(tmp_path: Path) -> None:
    # fc keeps its own rate; the rest is planned from the found one
    args = [*QUICK, *SHRINK, "trainer.max_epochs=2", "optim.groups=[{modules: fc, lr: 0.05}]"]
    auto = train_here(*args, "optim.lr=auto", run_dir=tmp_path / "auto")
    metrics = read_json(auto / "metrics.json")
    found = metrics["lr_finder"]["suggested"]
    assert metrics["lr"] == found and metrics["lr_finder"]["steps"] == 100
    assert found == pytest.approx(metrics["lr_finder"]["lowest_loss_at"] / 10)
    assert (auto / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    manifest = read_json(auto / "manifest.json")
    assert manifest["config"]["optim"]["lr"] == found
    lrs = {g["name"]: g["lr"] for g in manifest["optimizer"]["groups"]}
    assert lrs["fc"] == 0.05 and lrs["all"] == found
    given = train_here(*args, f"optim.lr={found!r}", run_dir=tmp_path / "given")
    a, b = load_file(auto / "model.safetensors"), load_file(given / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(given / "metrics.json")["val/acc"] == metrics["val/acc"]


def test_inspect_says_the_rate_is_found_at_the_start(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    _, out, _ = main_here("inspect", *QUICK, "optim.lr=auto", capsys=capsys)
    assert ("note: optim.lr=auto: Lightning's learning-rate finder picks the rate before the "
            "run trains; until then the groups below use 0.001") in out
    cfg, _ = compose_config([*QUICK, "optim.lr=auto"])
    assert OmegaConf.select(cfg, "optim.lr") == "auto"  # the plan leaves the config as given
