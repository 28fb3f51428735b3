"""Weight loading: name-and-shape matching, the report, wrappers, torchvision's cache, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from finetune.compose.schema import WeightsConfig
from finetune.errors import FinetuneError
from finetune.models import heads
from finetune.weights.load_report import LoadReport
from finetune.weights.loading import load_matching, load_weights
from finetune.weights.readers import read_torchvision
from tests.conftest import save_torchvision_checkpoint, trust_weights_file


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
    trust_weights_file(target)  # random weights: their hash is not the one in the name
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


# -- issue 3: every source, one key mapping ------------------------------------------------

def _resnet18_state(seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def _assert_identical(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_lightning_style_checkpoint_loads_bit_identical(tmp_path: Path) -> None:
    state = _resnet18_state()
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 90, "pytorch-lightning_version": "2.6.6",
                "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    model = torchvision.models.resnet18()
    report = load_weights(model, _cfg(source="file", path=str(path)), "resnet18", ["fc"])
    assert report.container == "state_dict"
    assert report.missing == [] and report.unexpected == [] and report.shape_skipped == []
    _assert_identical(model, state)


def test_safetensors_and_model_container(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _resnet18_state()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    model = torchvision.models.resnet18()
    load_weights(model, _cfg(source="file", path=str(tmp_path / "w.safetensors")), "resnet18",
                 ["fc"])
    _assert_identical(model, state)
    torch.save({"model": state, "optimizer": {}}, tmp_path / "c.pth")
    report = load_weights(torchvision.models.resnet18(),
                          _cfg(source="file", path=str(tmp_path / "c.pth")), "resnet18", ["fc"])
    assert report.container == "model" and report.missing == []


def test_unknown_prefix_fails_with_a_hint_then_loads_with_it(tmp_path: Path) -> None:
    state = _resnet18_state()
    path = tmp_path / "prefixed.pth"
    torch.save({f"backbone.{k}": v for k, v in state.items()}, path)
    with pytest.raises(FinetuneError, match=r"starts with 'backbone\.': set "
                                            r"weights\.strip_prefix=backbone\."):
        load_weights(torchvision.models.resnet18(), _cfg(source="file", path=str(path)),
                     "resnet18", ["fc"])
    model = torchvision.models.resnet18()
    report = load_weights(model, _cfg(source="file", path=str(path), strip_prefix="backbone."),
                          "resnet18", ["fc"])
    assert report.renamed["backbone.conv1.weight"] == "conv1.weight"
    _assert_identical(model, state)


def test_rename_regex_and_exclude_globs(tmp_path: Path) -> None:
    state = _resnet18_state()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    model = torchvision.models.resnet18()
    model.fclass = model.fc
    del model.fc
    report = load_weights(model, _cfg(source="file", path=str(path),
                                      rename={r"^fc\.": "fclass."}, exclude=["layer4.1.*"]),
                          "resnet18", ["fclass"])
    assert report.renamed["fc.weight"] == "fclass.weight" and "fclass.weight" in report.loaded
    assert "layer4.1.conv1.weight" in report.excluded
    assert "layer4.1.conv1.weight" in report.missing


def test_require_stops_before_training_naming_the_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(_resnet18_state(), path)
    model = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(FinetuneError, match=r"under 'fc\.\*' did not load, e\.g\. fc\.weight "
                                            r"\(shape \[1000, 512\] vs \[4, 512\]\)"):
        load_weights(model, _cfg(source="file", path=str(path), require=["fc.*"]), "resnet18",
                     ["fc"])
    with pytest.raises(FinetuneError, match="matches no model tensor"):
        load_weights(torchvision.models.resnet18(num_classes=4),
                     _cfg(source="file", path=str(path), require=["head.*"]), "resnet18", [])


def test_file_url_is_cached_under_its_sha256_and_pinned(tmp_path: Path, monkeypatch) -> None:
    from finetune.rundir.artifacts import file_sha256
    from finetune.weights.readers import cached_download, downloads_dir, hub_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "finetune_home"))
    state = _resnet18_state()
    served = tmp_path / "served" / "resnet18-f37072fd.pth"  # torchvision's own file name
    served.parent.mkdir()
    torch.save(state, served)
    url, sha = served.as_uri(), file_sha256(served)
    with pytest.raises(FinetuneError, match=r"does not match weights\.sha256=00ff"):
        load_weights(torchvision.models.resnet18(), _cfg(source="url", url=url, sha256="00ff"),
                     "resnet18", ["fc"])
    assert cached_download(url) is None, "a download that fails its pin must not be cached"
    assert [p.name for p in downloads_dir().iterdir()] == [], "no partial file left"
    model = torchvision.models.resnet18()
    report = load_weights(model, _cfg(source="url", url=url, sha256=sha), "resnet18", ["fc"])
    cached = downloads_dir() / f"{sha}.pth"
    assert report.url == url and report.path == str(cached) and report.sha256 == sha
    # Never under torchvision's name in torch's hub cache: a URL cannot plant weights that
    # later `weights.source: torchvision` runs would load.
    assert not hub_path(url).exists() and not (tmp_path / "home").exists()
    _assert_identical(model, state)
    served.unlink()  # loads from the cache now, offline, with or without the pin
    load_weights(torchvision.models.resnet18(), _cfg(source="url", url=url, sha256=sha),
                 "resnet18", ["fc"])
    load_weights(torchvision.models.resnet18(), _cfg(source="url", url=url), "resnet18", ["fc"])
    cached.write_bytes(cached.read_bytes()[:1000])
    with pytest.raises(FinetuneError, match=f"{cached} has sha256 .*its name promises.*delete"):
        load_weights(torchvision.models.resnet18(), _cfg(source="url", url=url), "resnet18",
                     ["fc"])


def test_torchvision_cache_file_is_checked_against_the_hash_in_its_name(
        tmp_path: Path, monkeypatch) -> None:
    """A file planted under torchvision's name (random weights here) is refused before it
    is read, naming the file to delete; once the user vouches for it, it loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "finetune_home"))
    path, state = save_torchvision_checkpoint(tmp_path, "resnet18", trust=False)
    with pytest.raises(FinetuneError) as refused:
        read_torchvision("resnet18", "DEFAULT")
    from finetune.commands.recipes import validate_recipe
    from finetune.rundir import artifacts

    sha = artifacts.file_sha256(path)
    message = str(refused.value)
    assert message.startswith(f"weights resnet18/IMAGENET1K_V1: the cached file {path} has "
                              f"sha256 {sha}, which does not start with the f37072fd its name "
                              "promises")
    assert "delete it and run again" in message
    # `recipes validate` asks the same question and says the same sentence
    recipe = tmp_path / "tv.yaml"
    recipe.write_text("model:\n  name: resnet18\nweights:\n  source: torchvision\n"
                      "  name: DEFAULT\ndata:\n  image_size: 32\n")
    problems, _ = validate_recipe(str(recipe), [])
    assert message in problems, problems
    # the line it prints is the line trusted_weights.txt needs (all 64 hex digits)
    trusted, _, line = message.partition("vouch for it with this line in ")[2].partition(": ")
    line = line.split(" (echo ")[0]
    assert line == sha and len(line) == 64
    Path(trusted).parent.mkdir(parents=True, exist_ok=True)
    Path(trusted).write_text(line + "\n")
    assert validate_recipe(str(recipe), [])[0] == []
    tensors, report = read_torchvision("resnet18", "DEFAULT")
    assert report.path == str(path) and set(tensors) == set(state)


def test_one_channel_first_conv_is_adapted_and_keeps_outputs(tmp_path: Path) -> None:
    from finetune.models.surgery import apply_surgery

    state = _resnet18_state()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    rgb = torchvision.models.resnet18()
    rgb.load_state_dict(state)
    gray_model = apply_surgery(torchvision.models.resnet18(), [
        {"op": "replace", "path": "conv1", "with": {
            "type": "Conv2d", "in_channels": 1, "out_channels": 64, "kernel_size": 7,
            "stride": 2, "padding": 3, "bias": False}}], 32, channels=1).model
    report = load_weights(gray_model, _cfg(source="file", path=str(path)), "resnet18", ["fc"])
    assert report.adapted == [{"key": "conv1.weight", "checkpoint_shape": [64, 3, 7, 7],
                               "model_shape": [64, 1, 7, 7],
                               "how": "input channels 3 -> 1 (summed)"}]
    assert report.missing == [] and report.shape_skipped == []
    gray = torch.rand(2, 1, 48, 48)
    with torch.inference_mode():
        expected = rgb.eval()(gray.repeat(1, 3, 1, 1))
        actual = gray_model.eval()(gray)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_a_weights_file_that_would_inflate_in_memory_is_refused(tmp_path: Path) -> None:
    """torch writes tensors stored; a repacked zip whose member is deflated zeros turns 8 KB
    into 8 MB (x1000). Refused by the weights reader and by resume, before torch reads it."""
    import zipfile

    from finetune.training.resume import check_resumable
    from finetune.weights.readers import read_file

    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(2 * 1024 * 1024)}, plain)
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size * 100 < plain.stat().st_size
    assert torch.load(bomb, weights_only=True)["w"].numel() == 2 * 1024 * 1024  # torch would
    with pytest.raises(FinetuneError,
                       match=r"would inflate from [\d,]+ bytes to 8,38\d,\d+ in memory"):
        read_file(str(bomb))
    with pytest.raises(FinetuneError, match=r"resume=.*: the checkpoint .* would inflate"):
        check_resumable(bomb, None)  # type: ignore[arg-type]
    assert read_file(str(plain))[0]["w"].numel() == 2 * 1024 * 1024  # as torch.save wrote it
    # a directory Python's zipfile cannot measure (a version it does not know) is not read:
    # torch's reader ignores the field and would inflate it
    data = bytearray(bomb.read_bytes())
    for at in [i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02"]:
        data[at + 6:at + 8] = (255).to_bytes(2, "little")
    unmeasured = tmp_path / "unmeasured.pth"
    unmeasured.write_bytes(bytes(data))
    with pytest.raises(FinetuneError, match=r"cannot be read .*damaged zip file"):
        read_file(str(unmeasured))
