"""data.uint8_batches: the loader gives uint8 images and the device makes them float and
normalizes them; every case gives, bit for bit, the tensors of the loader-normalized path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.compose.prepare import compose_config
from finetune.data.datamodule import build_datamodule, uint8_batches
from finetune.errors import FinetuneError
from finetune.training.plan import preprocessing_for
from tests.conftest import QUICK, SHRINK, problems_here, read_json, train_here, write_digit_images

AUGMENT = "data.augment=[{RandomResizedCrop: {scale: [0.5, 1.0]}}, RandomHorizontalFlip]"


def _pair(*overrides: str):
    """The datamodule of `overrides` twice: normalized in the loader, and uint8."""
    cfg, _ = compose_config(["weights.source=none", "data.image_size=24",
                             "data.batch_size=8", *overrides])
    prep = preprocessing_for(cfg)
    return (build_datamodule(cfg.data, prep, cfg.seed, uint8=False),
            build_datamodule(cfg.data, prep, cfg.seed, uint8=True))


def _batches(data, loader) -> list[list[torch.Tensor]]:
    return [data.on_after_batch_transfer(batch, 0) for batch in loader]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uint8") / "images"
    write_digit_images(root, [0, 1, 2], 8, mode="RGB")
    return root


# Every path an item takes to the loader: in-memory images transformed once before the run
# (digits, no augmentation) or per item (augmented); image files decoded per item or read
# from the decoded-image cache, with and without random augmentation; one channel.
CASES = {
    "in memory, transformed once": ["data=digits"],
    "in memory, augmented": ["data=digits", AUGMENT],
    "files": ["data=imagefolder", "data.decode_cache=false", AUGMENT],
    "decoded cache": ["data=imagefolder", "data.decode_cache=true"],
    "decoded cache, augmented": ["data=imagefolder", "data.decode_cache=true", AUGMENT],
    "grayscale files": ["data=imagefolder", "data.decode_cache=false", "data.channels=1"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_uint8_batches_equal_the_loader_normalized_ones_bit_for_bit(case: str, folder: Path
                                                                     ) -> None:
    overrides = [o.replace("ROOT", str(folder)) for o in CASES[case]]
    if "data=imagefolder" in overrides:
        overrides.append(f"data.root={folder}")
    plain, small = _pair(*overrides)
    assert plain.on_device is None and small.on_device is not None
    for split in ("train", "val"):
        made = getattr(small, f"{split}_dataloader")()
        raw = next(iter(made))[0]
        assert raw.dtype == torch.uint8  # what crosses to the device
        a = _batches(plain, getattr(plain, f"{split}_dataloader")())
        b = _batches(small, made)
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.dtype == xb.dtype == torch.float32
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # what evaluation reads stays normalized in the loader, whatever the setting
    assert small.eval_dataset("val")[0][0].dtype == torch.float32


@pytest.mark.parametrize(("setting", "accelerator", "wanted"), [
    ("auto", "cpu", False), ("auto", "gpu", True), ("auto", "cuda", True), ("auto", "mps", True),
    ("auto", "auto", torch.cuda.is_available() or torch.backends.mps.is_available()),
    ("true", "cpu", True), (True, "gpu", True), ("false", "gpu", False), (False, "cpu", False),
])
def test_auto_is_on_where_an_accelerator_trains(setting: object, accelerator: str,
                                                wanted: bool) -> None:
    assert uint8_batches(setting, accelerator) is wanted


def test_a_bad_setting_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match=r"data.uint8_batches='fast': use auto, true"):
        uint8_batches("fast", "cpu")
    problems = problems_here(*QUICK, *SHRINK, "data.uint8_batches=fast", run_dir=tmp_path / "r")
    assert any(p.startswith("data.uint8_batches='fast'") for p in problems)
    detection = problems_here("recipe=digits_detection", "weights.source=none",
                              "data.uint8_batches=true", run_dir=tmp_path / "d")
    assert any(p.startswith("data.uint8_batches=true with task=detection") for p in detection)


@pytest.mark.parametrize("freeze", [[], ["freeze.train_from=layer4", "freeze.cache=true"]],
                         ids=["full", "feature cache"])
def test_a_run_with_uint8_batches_trains_the_same_weights(freeze: list[str], tmp_path: Path
                                                          ) -> None:
    args = [*QUICK, *SHRINK, *freeze]
    runs = {s: train_here(*args, f"data.uint8_batches={s}", run_dir=tmp_path / s)
            for s in ("true", "false")}
    a, b = (load_file(runs[s] / "model.safetensors") for s in ("true", "false"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = {s: read_json(runs[s] / "metrics.json") for s in runs}
    assert metrics["true"]["uint8_batches"] is True and metrics["false"]["uint8_batches"] is False
    assert metrics["true"]["val/loss"] == metrics["false"]["val/loss"]
    if freeze:
        assert metrics["true"]["feature_cache"]["status"] == "computed"
