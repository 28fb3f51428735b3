"""Datamodules on real data: the bundled digits, PNG folders, CSV lists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune.compose.schema import DataConfig
from finetune.data.datamodule import build_datamodule
from finetune.data.formats import FORMATS
from finetune.data.transforms import train_transform
from finetune.errors import FinetuneError
from finetune.models.backbones import Preprocessing
from tests.conftest import write_digit_images

PREP = Preprocessing(resize=32, crop=32, mean=[0.5] * 3, std=[0.25] * 3)


def _data(**kwargs: object):
    return OmegaConf.structured(DataConfig(**kwargs))


def test_digits_subset_split_is_stratified_and_seeded() -> None:
    dm = build_datamodule(_data(name="digits", classes=[1, 2, 3, 4, 5, 6, 7, 8, 9]), PREP, 0)
    assert dm.class_names == [str(d) for d in range(1, 10)]
    labels = dm.train_set.labels + dm.val_set.labels
    assert sorted(set(labels)) == list(range(9))
    assert len(labels) == 1797 - 178  # every digit but the 178 zeros
    totals = torch.bincount(torch.tensor(labels))
    val_counts = torch.bincount(torch.tensor(dm.val_set.labels))
    assert ((val_counts - 0.2 * totals).abs() <= 1).all()  # stratified: 20% of every class
    again = build_datamodule(_data(name="digits", classes=list(range(1, 10))), PREP, 0)
    assert torch.equal(again.val_set.images, dm.val_set.images)
    other = build_datamodule(_data(name="digits", classes=list(range(1, 10))), PREP, 1)
    assert not torch.equal(other.val_set.images, dm.val_set.images)
    image, _ = dm.val_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1])  # gray repeated on 3 channels


def test_digits_class_order_follows_config() -> None:
    dm = build_datamodule(_data(name="digits", classes=[7, 3]), PREP, 0)
    assert dm.class_names == ["7", "3"]
    assert sorted(set(dm.train_set.labels)) == [0, 1]


def test_imagefolder_reads_gray_rgb_and_rgba_pngs(digits_folder: Path) -> None:
    dm = build_datamodule(_data(name="imagefolder", root=str(digits_folder), val_fraction=0.2,
                                augment=[]), PREP, 0)
    assert dm.class_names == ["0", "1", "2"]
    assert len(dm.train_set) == 72 and len(dm.val_set) == 18
    for dataset in (dm.train_set, dm.val_set):
        for i in range(len(dataset)):
            image, _ = dataset[i]
            assert image.shape == (3, 32, 32)


def test_imagefolder_with_train_and_val_folders(tmp_path: Path) -> None:
    write_digit_images(tmp_path / "train", [4, 5], 10)
    write_digit_images(tmp_path / "val", [4, 5], 3)
    dm = build_datamodule(_data(name="imagefolder", root=str(tmp_path)), PREP, 0)
    assert dm.class_names == ["4", "5"]
    assert len(dm.train_set) == 20 and len(dm.val_set) == 6
    assert all("val" in p.parts for p in dm.val_set.paths)


def test_csv_list_with_relative_paths(tmp_path: Path) -> None:
    written = write_digit_images(tmp_path / "imgs", [3, 8], 10)
    rows = ["path,label"] + [f"imgs/{d}/{p.name},digit{d}" for d, ps in written.items()
                             for p in ps]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    dm = build_datamodule(_data(name="csv", root=str(tmp_path / "labels.csv")), PREP, 0)
    assert dm.class_names == ["digit3", "digit8"]
    assert len(dm.train_set) + len(dm.val_set) == 20
    assert dm.val_set[0][0].shape == (3, 32, 32)


def test_csv_lists_as_spreadsheets_write_them(tmp_path: Path) -> None:
    """A byte-order mark (Excel's "CSV UTF-8") before the header, spaces and a comment read
    as the plain file; rows without a label, without a path or with one field are all named
    at once; bytes that are not UTF-8 are one sentence."""
    written = write_digit_images(tmp_path / "imgs", [3, 8], 6)
    rows = [f"imgs/{d}/{p.name}, digit{d}" for d, ps in written.items() for p in ps]
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\n# a comment\n".encode()
                                       + "\n".join(rows).encode() + b"\n")
    dm = build_datamodule(_data(name="csv", root=str(tmp_path / "bom.csv")), PREP, 0)
    assert dm.class_names == ["digit3", "digit8"]
    assert FORMATS["csv"].class_names(_data(name="csv", root=str(tmp_path / "bom.csv"))) == [
        "digit3", "digit8"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n" + "\n".join([rows[0], "imgs/3/0.png,", rows[1], ",digit3",
                                                "lonely.png", "imgs/8/1.png,  "]) + "\n")
    with pytest.raises(FinetuneError) as refused:
        build_datamodule(_data(name="csv", root=str(bad)), PREP, 0)
    assert str(refused.value) == (
        f"data.root: {bad} needs rows of path,label; fewer than two fields on line 6; no path "
        "on line 5; an empty label on lines 3, 7 (fix or remove those rows)")
    bad.write_bytes(b"path,label\nimgs/3/0.png,\xff\xfe\n")
    with pytest.raises(FinetuneError, match=rf"data.root: {bad}: not UTF-8 text \(byte 24\)"):
        build_datamodule(_data(name="csv", root=str(bad)), PREP, 0)


def test_missing_root_and_empty_class_folder_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="no such folder"):
        build_datamodule(_data(name="imagefolder", root=str(tmp_path / "nope")), PREP, 0)
    with pytest.raises(FinetuneError, match="no class subfolders"):
        build_datamodule(_data(name="imagefolder", root=str(tmp_path)), PREP, 0)
    write_digit_images(tmp_path, [1], 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match=r"class folder .*empty holds no images"):
        build_datamodule(_data(name="imagefolder", root=str(tmp_path)), PREP, 0)


def test_augmentations_by_torchvision_name() -> None:
    transform = train_transform(PREP, [{"RandomResizedCrop": {"scale": [0.5, 1.0]}},
                                       "RandomHorizontalFlip"])
    out = transform(torch.randint(0, 255, (3, 50, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32)
    with pytest.raises(FinetuneError, match="did you mean 'RandomHorizontalFlip'"):
        train_transform(PREP, ["RandomHorizontalFlp"])


def test_shipped_imagefolder_augmentations_build(digits_folder: Path) -> None:
    from hydra import compose, initialize_config_dir

    from finetune.compose.prepare import prepare
    from finetune.locations import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=prepare(["data=imagefolder",
                                                   f"data.root={digits_folder}"]))
    dm = build_datamodule(cfg.data, PREP, 0)
    assert len(dm.train_set.transform.transforms) > len(dm.val_set.transform.transforms)
    assert dm.train_set[0][0].shape == (3, 32, 32)


def test_named_augmentations_run_in_the_pipeline() -> None:
    names = [{"RandomResizedCrop": {"scale": [0.6, 1.0]}}, "RandomHorizontalFlip",
             "TrivialAugmentWide", {"ColorJitter": {"brightness": 0.3}},
             {"RandomErasing": {"p": 1.0}}]
    out = train_transform(PREP, names)(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_few_shot_train_size_keeps_every_class_in_proportion() -> None:
    dm = build_datamodule(_data(name="digits", classes=[5, 6, 7, 8, 9], train_size=25), PREP, 0)
    assert len(dm.train_set) == 25
    assert torch.bincount(torch.tensor(dm.train_set.labels)).tolist() == [5] * 5
    full = build_datamodule(_data(name="digits", classes=[5, 6, 7, 8, 9]), PREP, 0)
    assert torch.equal(dm.val_set.images, full.val_set.images)  # validation is untouched
    with pytest.raises(FinetuneError, match="fewer images than the 5 classes"):
        build_datamodule(_data(name="digits", classes=[5, 6, 7, 8, 9], train_size=3), PREP, 0)


def test_one_channel_input_uses_averaged_statistics() -> None:
    from finetune.models.backbones import preprocessing

    prep = preprocessing(None, 32, channels=1)
    assert prep.channels == 1 and len(prep.mean) == len(prep.std) == 1
    assert prep.mean[0] == pytest.approx(sum([0.485, 0.456, 0.406]) / 3)
    dm = build_datamodule(_data(name="digits", channels=1), prep, 0)
    image, _ = dm.val_set[0]
    assert image.shape == (1, 32, 32)
