"""MixUp / CutMix as batch transforms (data.mix): torchvision v2's own with soft targets,
on each training batch; refused with the feature cache, and as per-image augmentations."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import QUICK, SHRINK, problems_here, read_json, train_here

from finetune.data.mixing import BatchMix


def test_mixup_mixes_each_image_with_its_neighbour_and_the_targets_alike() -> None:
    """v2.MixUp pairs image i with image i-1 (the batch rolled by one) with one lambda; the
    soft target says the same shares."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, target = BatchMix(5, mixup_alpha=0.4)(x, y)
    assert target.shape == (6, 5) and torch.allclose(target.sum(1), torch.ones(6))
    lam = float(target[1, 1])  # image 1 (class 1) mixed with image 0 (class 0)
    assert 0 < lam < 1 and torch.allclose(target[1, 0], torch.tensor(1 - lam))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_a_box_and_prob_zero_mixes_nothing() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    mixed, target = BatchMix(4, cutmix_alpha=1.0)(x, y)
    from_other = (mixed != x).any(1)  # pixels taken from the neighbour
    share = float(from_other[1].float().mean())
    assert 0 < share < 1 and torch.allclose(target[1, 0], torch.tensor(share), atol=1e-6)
    same, one_hot = BatchMix(4, mixup_alpha=0.4, prob=0.0)(x, y)
    assert torch.equal(same, x) and torch.equal(one_hot, torch.eye(4))


def test_a_run_with_mixup_and_cutmix_trains_and_caches_nothing(tmp_path: Path) -> None:
    run = train_here(*QUICK, *SHRINK, "data.mix.mixup_alpha=0.2", "data.mix.cutmix_alpha=1.0",
                     "freeze.train_from=layer4", "trainer.max_epochs=2",
                     run_dir=tmp_path / "run")
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete"
    assert metrics["feature_cache"] == {"status": "off",
                                        "reason": "off: data.mix mixes the images of each batch"}
    assert read_json(run / "manifest.json")["config"]["data"]["mix"] == {
        "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0}


def test_mixing_where_it_cannot_work_is_refused() -> None:
    assert problems_here(*QUICK, "data.mix.mixup_alpha=0.2", "freeze.train_from=layer4",
                         "freeze.cache=true") == [
        "freeze.cache=true but data.mix mixes images: the frozen layers see other inputs every "
        "step, so their outputs cannot be computed once; use freeze.cache=auto (off here) or "
        "drop data.mix"]
    assert problems_here(*QUICK, "data.augment=[MixUp]") == [
        "data.augment[0]: MixUp mixes pairs of images and their labels across a batch, which a "
        "per-image augmentation cannot do; remove it and set data.mix: {mixup_alpha: 0.2} "
        "(applied to each training batch)"]
    assert problems_here(*QUICK, "data.mix.prob=1.5")[0].startswith(
        "data.mix.prob=1.5: must be in [0, 1]")
