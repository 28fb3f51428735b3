"""Weight loading: name-and-shape matching, the report, wrappers, torchvision's cache, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from finetune import heads
from finetune.config import WeightsConfig
from finetune.errors import FinetuneError
from finetune.weights import LoadReport, load_matching, load_weights, read_torchvision
from tests.conftest import save_torchvision_checkpoint


def _cfg(**kwargs: object):
    return OmegaConf.structured(WeightsConfig(**kwargs))


def test_shape_skips_are_reported_with_both_shapes() -> None:
    source = torchvision.models.resnet18().state_dict()
    model = torchvision.models.resnet18(num_classes=9)
    report = load_matching(model, source, LoadReport(source="file"))
    assert report.shape_skipped == [
        {"key": "fc.weight", "checkpoint_shape": [1000, 512], "model_shape": [9, 512]},
        {"key": "fc.bias", "checkpoint_shape": [1000], "model_shape": [9]},
    ]
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(source) - 2
    assert report.summary().startswith(f"loaded {len(source) - 2}/{len(source)} tensors")
    assert "new: fc.weight, fc.bias" in report.summary()
    assert torch.equal(model.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])


def test_shape_mismatch_error_policy() -> None:
    source = torchvision.models.resnet18().state_dict()
    with pytest.raises(FinetuneError, match=r"fc.weight \[1000, 512\] in the checkpoint"):
        load_matching(torchvision.models.resnet18(num_classes=9), source,
                      LoadReport(source="file"), on_shape_mismatch="error")


def test_file_source_strips_dataparallel_prefix(tmp_path: Path) -> None:
    torch.manual_seed(3)
    original = torchvision.models.resnet18()
    wrapped = {f"module.{k}": v for k, v in original.state_dict().items()}
    path = tmp_path / "dp.pth"
    torch.save(wrapped, path)
    model = torchvision.models.resnet18()
    report = load_weights(model, _cfg(source="file", path=str(path)), "resnet18", ["fc"])
    assert report.missing == [] and report.unexpected == [] and report.shape_skipped == []
    assert report.renamed["module.conv1.weight"] == "conv1.weight"
    for key, value in model.state_dict().items():
        assert torch.equal(value, original.state_dict()[key]), key


def test_checkpoint_of_another_architecture_fails_min_loaded(tmp_path: Path) -> None:
    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.vgg11().state_dict(), path)
    model = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(FinetuneError, match=r"only 0 of \d+ backbone tensors matched"):
        load_weights(model, _cfg(source="file", path=str(path)), "resnet18", ["fc"])


def test_old_checkpoints_without_num_batches_tracked_are_benign() -> None:
    source = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
              if not k.endswith("num_batches_tracked")}
    report = load_matching(torchvision.models.resnet18(), source, LoadReport(source="file"))
    assert report.missing == []


def test_torchvision_source_reads_torch_home_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, state = save_torchvision_checkpoint(tmp_path, "resnet18")
    model = torchvision.models.resnet18()
    paths = heads.replace_heads(model, 5)
    report = load_weights(model, _cfg(source="torchvision", name="DEFAULT"), "resnet18", paths)
    assert report.path == str(path)
    assert report.url.endswith(path.name)
    assert len(report.sha256) == 64
    assert [s["key"] for s in report.shape_skipped] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_densenet_old_keys_are_renamed_like_torchvision_does(tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    entry = torchvision.models.DenseNet121_Weights.DEFAULT
    # The published checkpoints predate BatchNorm's num_batches_tracked.
    state = {k: v for k, v in torchvision.models.densenet121().state_dict().items()
             if not k.endswith("num_batches_tracked")}
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
           for k, v in state.items()}
    assert old != state
    target = tmp_path / "hub" / "checkpoints" / Path(entry.url).name
    target.parent.mkdir(parents=True)
    torch.save(old, target)
    tensors, report = read_torchvision("densenet121", "DEFAULT")
    assert set(tensors) == set(state)
    assert report.renamed


def test_offline_without_cache_names_url_and_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # No network here (and CI has none to download.pytorch.org): the download must fail fast.
    with pytest.raises(FinetuneError) as info:
        read_torchvision("resnet18", "IMAGENET1K_V1")
    message = str(info.value)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(expected) in message


def test_weights_files_are_read_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(FinetuneError, match="cannot be read as a weights-only state dict"):
        load_weights(torchvision.models.resnet18(), _cfg(source="file", path=str(path)),
                     "resnet18", ["fc"])
    assert not marker.exists()


def test_truncated_file_gets_one_message(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(FinetuneError, match="truncated or corrupt, delete it"):
        load_weights(torchvision.models.resnet18(), _cfg(source="file", path=str(path)),
                     "resnet18", ["fc"])
