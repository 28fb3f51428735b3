"""The decoded-image cache: the same tensors as decoding every epoch, bit for bit; keyed by
the files and the transform; a damaged array is decoded again, never read."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from finetune.compose.prepare import compose_config
from finetune.data.datamodule import build_datamodule
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
    from finetune.data import decoded_cache as decoded

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
