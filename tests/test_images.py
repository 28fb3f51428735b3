"""Images decoded right, the same in training, validation and predict: 16-bit grayscale by
its real range, alpha over black, EXIF orientation applied, oversized images skipped and
listed (finetune/data/images.py)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_digit_images
from omegaconf import OmegaConf
from PIL import Image

from finetune.compose.schema import DataConfig
from finetune.data.datamodule import build_datamodule
from finetune.data.images import DEFAULT_MAX_PIXELS, ImageProblem, open_rgb
from finetune.models.backbones import preprocessing


def _gray16(path: Path, value: int, size: int = 16) -> Path:
    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)
    return path


def test_16_bit_grayscale_keeps_its_range(tmp_path: Path) -> None:
    """Pillow's convert("RGB") clips 16-bit values to 255: 1000 and 30000 became the same
    white. Scaled by 0..65535, they stay apart, exactly."""
    dark, light = _gray16(tmp_path / "dark.png", 1000), _gray16(tmp_path / "light.png", 30000)
    with Image.open(dark) as raw:
        assert raw.mode.startswith("I")  # a real 16-bit PNG
    got = [np.asarray(open_rgb(p)) for p in (dark, light)]
    assert got[0].shape == (16, 16, 3) and got[0].dtype == np.uint8
    assert (got[0] == round(1000 / 65535 * 255)).all()
    assert (got[1] == round(30000 / 65535 * 255)).all()


def test_alpha_is_composited_over_black(tmp_path: Path) -> None:
    """A transparent pixel is black whatever colour it stores; an opaque one keeps its own;
    the same for a palette image with a transparent index."""
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # every pixel stores red
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 0, 128, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(open_rgb(tmp_path / "a.png"))
    assert got[0, 0].tolist() == [0, 0, 0] and got[1, 0].tolist() == [255, 0, 0]
    assert got[0, 1].tolist() == [128, 0, 0]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(open_rgb(tmp_path / "p.png")).tolist() == [[[0, 0, 0], [0, 255, 0]]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6 (the camera held upright, the pixels stored turned): a 2x1 image whose
    left pixel is red reads as 1x2 with red on top, as a viewer shows it."""
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (255, 0, 0))
    image.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "turned.jpg", exif=exif, quality=100, subsampling=0)
    got = open_rgb(tmp_path / "turned.jpg")
    assert got.size == (1, 2)
    top, bottom = np.asarray(got)[0, 0].tolist(), np.asarray(got)[1, 0].tolist()
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG header claiming a size it does not hold (what a decompression bomb says)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_oversized_images_are_refused_from_their_header(tmp_path: Path) -> None:
    small = _gray16(tmp_path / "small.png", 5, size=16)
    with pytest.raises(ImageProblem, match=r"16x16 = 256 pixels, over the limit of 100 "
                                           r"\(data.max_image_pixels"):
        open_rgb(small, max_pixels=100)
    assert open_rgb(small, max_pixels=256).size == (16, 16)
    bomb = _png_claiming(tmp_path / "bomb.png", 30_000, 30_000)  # 900 M pixels, 33 bytes
    with pytest.raises(ImageProblem, match=r"over the limit|larger than Pillow's limit"):
        open_rgb(bomb)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # Pillow's own guard is left as is


def test_training_and_validation_decode_alike(tmp_path: Path) -> None:
    """An image folder of 16-bit PNGs: the two classes stay two different inputs; an image
    over data.max_image_pixels is skipped and listed like an undecodable one."""
    root = tmp_path / "imgs"
    for label, value in (("dark", 1000), ("light", 30000)):
        (root / label).mkdir(parents=True)
        for i in range(6):
            _gray16(root / label / f"{i}.png", value)
    Image.new("L", (40, 40)).save(root / "light" / "big.png")
    cfg = OmegaConf.structured(DataConfig(name="imagefolder", root=str(root), image_size=16,
                                          batch_size=4, num_workers=0, max_image_pixels=1000))
    data = build_datamodule(cfg, preprocessing(None, 16), 0)
    assert [(Path(p).name, r.split(",")[0]) for p, r in data.bad_images] == [
        ("big.png", "40x40 = 1")]
    inputs = {}
    for dataset in (data.train_set, data.val_set):
        for i in range(len(dataset)):
            x, label = dataset[i]
            inputs.setdefault(label, set()).add(round(float(x.mean()), 4))
    assert all(len(v) == 1 for v in inputs.values()) and len(set().union(*inputs.values())) == 2


def test_the_digit_folder_reads_in_every_mode(tmp_path: Path) -> None:
    """Grayscale, RGB and opaque RGBA copies of the same digit decode to the same pixels."""
    for mode in ("L", "RGB", "RGBA"):
        write_digit_images(tmp_path / mode, [4], 1, mode=mode)
    got = [np.asarray(open_rgb(next((tmp_path / m / "4").glob("*.png"))))
           for m in ("L", "RGB", "RGBA")]
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[1], got[2])


def test_a_received_run_dir_cannot_lift_the_pixel_guard_for_predict() -> None:
    """predict takes the run's data.max_image_pixels, but at most Pillow's default: a run
    dir from someone else could otherwise switch the decompression-bomb guard off."""
    from types import SimpleNamespace

    from torch import nn

    from finetune.rundir.inference import max_pixels_of

    def model_with(limit: object) -> nn.Module:
        model = nn.Identity()
        object.__setattr__(model, "manifest", SimpleNamespace(
            config={"data": {"max_image_pixels": limit}}))
        return model

    assert max_pixels_of(model_with(1000)) == 1000
    assert max_pixels_of(model_with(10**12)) == DEFAULT_MAX_PIXELS
    assert max_pixels_of(model_with("lots")) == DEFAULT_MAX_PIXELS
