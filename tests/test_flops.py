"""Where a run's compute goes: a training step's FLOPs counted as the step runs (forward, and
backward only where something trains), without touching the run; the device's peak; the MFU
in metrics.json, the summary and the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import QUICK, SHRINK, read_json, train_here
from torch import nn

from finetune.rundir.verdict import speed_line
from finetune.training.flops import peak_by_name, peak_of, step_flops, utilisation


def _two_layers(first_trains: bool, second_trains: bool) -> nn.Module:
    net = nn.Sequential(nn.Linear(10, 20, bias=False), nn.Linear(20, 5, bias=False))
    net[0].weight.requires_grad_(first_trains)
    net[1].weight.requires_grad_(second_trains)
    return net


@pytest.mark.parametrize(("first", "second", "expected"), [
    # forward 2x10x20 + 2x20x5 = 600 per image in every case; then the backward:
    (False, False, 600),  # nothing trains: no backward at all
    (False, True, 800),  # the second layer's weight gradient (200); no input gradients
    (True, False, 1200),  # the first layer's weight (400) needs the second's input grad (200)
    (True, True, 1400),  # both weights (400 + 200) and the second layer's input grad (200)
])
def test_a_step_is_counted_with_backward_only_where_something_trains(
        first: bool, second: bool, expected: int) -> None:
    assert step_flops(_two_layers(first, second), torch.randn(4, 10)) == expected


def test_counting_touches_no_weight_buffer_gradient_or_random_stream() -> None:
    net = torchvision.models.resnet18(num_classes=3)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    assert step_flops(net, x) > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(rng, torch.get_rng_state())


class _Checks(nn.Module):
    """A forward that refuses an input it cannot use (here: one without data, as meta
    tensors are) with an error of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            raise ValueError("this model needs real inputs")
        return x * 2


def test_a_step_the_counter_cannot_follow_counts_nothing_and_stops_nothing() -> None:
    assert step_flops(_Checks(), torch.ones(2, 3)) is None


def test_the_peak_comes_from_the_key_the_table_or_nowhere() -> None:
    assert peak_of(torch.device("cpu"), "32-true", 2.5) == (2.5, "trainer.peak_tflops")
    assert peak_of(torch.device("cpu"), "bf16-mixed", None)[0] is None
    assert peak_by_name("NVIDIA H200", "bf16-mixed")[0] == 989.0
    assert peak_by_name("NVIDIA H200", "32-true")[0] == 67.0
    assert peak_by_name("NVIDIA H100 PCIe", "16-mixed")[0] == 756.0  # before "H100"
    assert peak_by_name("NVIDIA A100-SXM4-80GB", "bf16-mixed")[0] == 312.0
    assert peak_by_name("Some New Card", "bf16-mixed") == (
        None, "no peak known for Some New Card; set trainer.peak_tflops")
    assert utilisation(2e9, 100.0, 0.4) == {"train_flops_per_image": 2_000_000_000,
                                            "train_tflops_per_device": 0.2, "mfu": 0.5}
    assert utilisation(2e9, 100.0, None)["mfu"] is None


def test_a_run_records_its_steps_flops_and_mfu(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = train_here(*QUICK, *SHRINK, "trainer.max_epochs=2", "trainer.peak_tflops=0.5",
                     run_dir=tmp_path / "whole")
    metrics = read_json(run / "metrics.json")
    model = torchvision.models.resnet18(num_classes=5)
    assert metrics["train_flops_per_image"] == round(step_flops(model, torch.randn(
        16, 3, 32, 32)))
    achieved = metrics["train_flops_per_image"] * metrics["train_images_per_second"] / 1e12
    assert metrics["train_tflops_per_device"] == pytest.approx(achieved, abs=1e-4)  # rounded
    assert metrics["mfu"] == pytest.approx(achieved / 0.5, abs=1e-4)
    assert f"  speed: {speed_line(metrics)}" in capsys.readouterr().out
    assert speed_line(metrics).startswith(f"{metrics['train_images_per_second']:,.0f} images/s")
    # with the frozen prefix cached, a step runs the suffix alone: fewer FLOPs per image
    cached = read_json(train_here(*QUICK, *SHRINK, "trainer.max_epochs=2",
                                  "freeze.train_from=layer4", "freeze.cache=true",
                                  run_dir=tmp_path / "cached") / "metrics.json")
    assert cached["feature_cache"]["status"] == "computed"
    assert 0 < cached["train_flops_per_image"] < metrics["train_flops_per_image"] / 4
    assert cached["mfu"] is None and cached["peak_source"].startswith("no peak known for cpu")
