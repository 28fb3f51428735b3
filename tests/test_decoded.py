"""The decoded-image cache: the same tensors as decoding every epoch, bit for bit; keyed by
the files and the transform; a damaged array is decoded again, never read."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from finetune.compose.prepare import compose_config
from finetune.data import decoded_cache as decoded
from finetune.data.datamodule import build_datamodule
from finetune.data.images import open_rgb
from finetune.data.transforms import resize_crop
from finetune.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from finetune.training.plan import preprocessing_for
from tests.conftest import write_digit_images

AUGMENT = "data.augment=[{RandomResizedCrop: {scale: [0.5, 1.0]}}, RandomHorizontalFlip]"


def _data(root: Path, *overrides: str):
    cfg, _ = compose_config(["weights.source=none", "data=imagefolder", f"data.root={root}",
                             "data.image_size=24", *overrides])
    return build_datamodule(cfg.data, preprocessing_for(cfg), cfg.seed)


def _items(dataset, keys) -> list[torch.Tensor]:
    return [dataset[k][0] for k in keys]


def test_cached_items_equal_decoded_items_bit_for_bit(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_digit_images(root, [0, 1, 2], 8, mode="RGB")
    plain = _data(root, "data.decode_cache=false", AUGMENT)
    cached = _data(root, "data.decode_cache=true", AUGMENT)
    assert plain.train_set.rows is None and cached.train_set.rows is not None
    keys = [(i, 1000 + i) for i in range(len(plain.train_set))]  # (index, augmentation seed)
    for a, b in zip(_items(plain.train_set, keys), _items(cached.train_set, keys), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_items(plain.val_set, range(len(plain.val_set))),
                    _items(cached.val_set, range(len(cached.val_set))), strict=True):
        assert torch.equal(a, b)
    files = sorted((Path(os.environ["FINETUNE_HOME"]) / "decoded").glob("*.u8"))
    assert files  # stored in finetune's own cache


def test_the_key_follows_the_files_and_a_damaged_array_is_decoded_again(tmp_path: Path) -> None:
    root = tmp_path / "images"
    written = write_digit_images(root, [3, 4], 6, mode="L")
    first = _data(root, "data.decode_cache=true")
    array_file = decoded._array_file(decoded.key_of(
        list(dict.fromkeys([*first.train_set.paths, *first.val_set.paths])),
        first_prep := preprocessing_for(compose_config([
            "weights.source=none", "data=imagefolder", f"data.root={root}",
            "data.image_size=24"])[0]), 89_478_485))
    assert array_file.is_file() and first_prep.crop == 24
    array_file.write_bytes(b"\0" * array_file.stat().st_size)  # same size, other content
    again = _data(root, "data.decode_cache=true")
    plain = _data(root, "data.decode_cache=false")
    for i in range(len(plain.val_set)):
        assert torch.equal(again.val_set[i][0], plain.val_set[i][0])  # decoded again
    path = written[3][0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = decoded.key_of(list(dict.fromkeys([*first.train_set.paths,
                                                 *first.val_set.paths])), first_prep,
                             89_478_485)
    assert decoded._array_file(changed) != array_file  # a changed file is another key


# A changed value for every field of the preprocessing: the cached array is the image after
# resize_crop, so the fields it reads must change the key and the others (normalization,
# applied after the cache) must not, or two runs would not share what they could.
FIELD_CHANGES = {"resize": 40, "crop": 20, "interpolation": "nearest", "channels": 1,
                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
LIMIT = 89_478_485


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Preprocessing)])
def test_the_key_changes_with_every_field_that_changes_the_cached_bytes(tmp_path: Path,
                                                                          field: str) -> None:
    assert set(FIELD_CHANGES) == {f.name for f in dataclasses.fields(Preprocessing)}
    paths = [p for ps in write_digit_images(tmp_path, [2, 7], 2, mode="RGB").values()
             for p in ps]
    base = Preprocessing(resize=32, crop=24, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    changed = dataclasses.replace(base, **{field: FIELD_CHANGES[field]})

    def cached(prep: Preprocessing) -> torch.Tensor:
        return v2.Compose(resize_crop(prep))(open_rgb(paths[0]))

    bytes_differ = cached(base).shape != cached(changed).shape or not torch.equal(
        cached(base), cached(changed))
    keys_differ = decoded.key_of(paths, base, LIMIT) != decoded.key_of(paths, changed, LIMIT)
    assert keys_differ == bytes_differ
    assert bytes_differ == (field not in ("mean", "std"))  # the rule's cases, both ways


@pytest.mark.parametrize("change", ["renamed", "rewritten", "grown", "pixel_limit", "none"])
def test_the_key_changes_with_every_file_and_the_pixel_limit(tmp_path: Path, change: str
                                                             ) -> None:
    paths = [p for ps in write_digit_images(tmp_path, [3], 3).values() for p in ps]
    prep = Preprocessing(resize=32, crop=24, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    before = decoded.key_of(paths, prep, LIMIT)
    limit = LIMIT
    if change == "renamed":
        paths[1] = paths[1].rename(paths[1].with_name("moved.png"))
    elif change == "rewritten":  # same size, a later modification time
        stat = paths[1].stat()
        os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "grown":
        with open(paths[1], "ab") as handle:
            handle.write(b"\0")
        os.utime(paths[1], ns=(paths[1].stat().st_atime_ns, paths[0].stat().st_mtime_ns))
    elif change == "pixel_limit":
        limit = LIMIT // 2
    assert (decoded.key_of(paths, prep, limit) != before) == (change != "none")


def test_cached_files_keep_their_loader_workers_and_workers_map_the_array(tmp_path: Path
                                                                          ) -> None:
    """The cache saves the decoding, not the per-item augmentation: `auto` gives cached files
    the workers it gives files (in the training process, each step would wait on them), the
    workers yield the tensors decoding would, and a worker started by spawn maps the cached
    file again rather than receiving the array."""
    import pickle

    import numpy as np

    from finetune.data.datamodule import loader_workers

    if loader_workers("auto", False) == 0:
        pytest.skip("one core: auto gives files no worker either")
    root = tmp_path / "images"
    write_digit_images(root, [0, 1, 2], 8, mode="RGB")
    plain = _data(root, "data.decode_cache=false", "data.num_workers=auto")
    cached = _data(root, "data.decode_cache=true", "data.num_workers=auto")
    assert cached.train_set.rows is not None
    assert cached.train_dataloader().num_workers == plain.train_dataloader().num_workers > 0
    loaded = [torch.cat([x for x, _ in data.val_dataloader()]) for data in (plain, cached)]
    assert cached.val_dataloader().num_workers > 0 and torch.equal(*loaded)
    rows = cached.train_set.rows
    sent = pickle.dumps(rows)
    assert len(sent) < 4096 < rows.array.nbytes  # the file's name, not its bytes
    again = pickle.loads(sent)
    assert isinstance(again.array, np.memmap) and again.array.filename == rows.array.filename
    assert torch.equal(again(0), rows(0))


def test_auto_decides_on_every_case_and_says_why() -> None:
    prep = Preprocessing(24, 24, IMAGENET_MEAN, IMAGENET_STD)
    cases = {  # (setting, epochs, features cached, images): (on, words of the reason)
        ("false", 5, False, 10): (False, "data.decode_cache=false"),
        ("true", 1, True, 10): (True, "data.decode_cache=true"),
        ("auto", 1, False, 10): (False, "one-epoch"),
        ("auto", 5, True, 10): (False, "freeze.cache"),
        ("auto", 5, False, 10**7): (False, "over auto's 4 GiB"),
        ("auto", 5, False, 10): (True, "on (auto): 5 epochs"),
    }
    for (setting, epochs, cached, count), (on, words) in cases.items():
        got, reason = decoded.decide(setting, count, prep, epochs, cached)
        assert got == on and words in reason, (setting, epochs, cached, count, reason)
    with pytest.raises(Exception, match="use auto, true or false"):
        decoded.decide("sometimes", 10, prep)


def test_a_run_decodes_its_files_only_when_it_reads_them_again(tmp_path: Path) -> None:
    """auto with a frozen prefix whose features are computed once reads every image once: no
    decoded copy is written; trained end to end over two epochs, the run decodes them once.
    Both say why in metrics.json, and inspect says it before anything runs."""
    from finetune.commands.inspect import inspect_plan, render
    from tests.conftest import read_json, train_here

    root = tmp_path / "images"
    write_digit_images(root, [0, 1, 2], 6, mode="RGB")
    common = ["recipe=base", "weights.source=none", "model.name=resnet18", "data=imagefolder",
              f"data.root={root}", "data.image_size=16", "trainer.max_epochs=2",
              "eval.report=false", "data.num_workers=0", "data.augment=[]"]
    folder = decoded.cache_folder()
    before = set(folder.glob("*.u8")) if folder.is_dir() else set()
    head = train_here(*common, "freeze.train_from=fc", run_dir=tmp_path / "head")
    info = read_json(head / "metrics.json")["decode_cache"]
    assert info["status"] == "off" and "freeze.cache" in info["reason"]
    assert read_json(head / "metrics.json")["feature_cache"]["status"] != "off"
    assert (set(folder.glob("*.u8")) if folder.is_dir() else set()) == before
    whole = train_here(*common, run_dir=tmp_path / "whole")
    info = read_json(whole / "metrics.json")["decode_cache"]
    assert info["status"] == "on" and "2 epochs" in info["reason"]
    assert len(set(folder.glob("*.u8")) - before) == 1
    for split, words in (("fc", "freeze.cache"), ("null", "on (auto): 2 epochs")):
        cfg, _ = compose_config([*common, f"freeze.train_from={split}"])
        plan = inspect_plan(cfg, "base")
        assert words in plan["decode_cache"] and words in render(plan)
