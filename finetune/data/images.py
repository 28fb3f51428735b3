"""Decoding an image file into the 8-bit RGB picture a model sees, the same way everywhere
(training, validation, `predict`), or one short reason why it cannot be.

What `Image.open(path).convert("RGB")` gets wrong, and what happens here instead:
- 16-bit (and 32-bit) grayscale is *clipped* to 255 by Pillow's convert, so most of the range
  turns white: it is scaled by its real range instead (16-bit: 0..65535; 32-bit integers that
  fit 16 bits: the same; floats: 0..1 when they lie there, else their own min..max).
- Transparent pixels keep whatever colour they store (often garbage): images with an alpha
  channel (RGBA, LA, PA, palette with transparency) are composited over black, so a
  transparent pixel is black whatever it stored.
- EXIF orientation (a phone photo taken upright, stored sideways) is applied.
- An image over `max_pixels` (Pillow's own guard against decompression bombs is 89,478,485
  pixels; `data.max_image_pixels` sets ours) is refused from its header alone, before any
  decoding: it is skipped and listed like an undecodable file.

Nothing here imports torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageProblem(Exception):
    """The file cannot become an image for the model (the message says why)."""


def _allow_up_to(max_pixels: int) -> None:
    """Pillow refuses an image over twice its own limit before we could say why: lift its
    limit when ours is higher (never lower it: other code in the process may rely on it)."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and max_pixels > current:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth grayscale image scaled by its real range to 8 bits."""
    values = np.asarray(image)
    if values.dtype.kind == "f":
        low, high = (0.0, 1.0) if values.size == 0 or (
            values.min() >= 0 and values.max() <= 1) else (float(values.min()),
                                                           float(values.max()))
    elif image.mode.startswith("I;16") or (values.size and values.min() >= 0
                                           and values.max() <= 65535):
        low, high = 0.0, 65535.0
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values.astype(np.float64) - low) / max(high - low, 1e-12)
    return Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: orientation applied, bit depth scaled, alpha over
    black."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _gray_to_8bit(image)
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The file at `path` decoded as 8-bit RGB (see the module docstring).

    Raises:
        ImageProblem: not an image, damaged, or larger than `max_pixels`; one short reason.
    """
    _allow_up_to(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageProblem(too_large(width, height, max_pixels))
                image.load()
                return to_rgb(image)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as err:
        raise ImageProblem(f"larger than Pillow's limit ({' '.join(str(err).split())[:120]})"
                           "; raise data.max_image_pixels to read it") from None
    except Exception as err:  # Pillow raises many types for a damaged file
        raise ImageProblem(f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
                           ) from None


def too_large(width: int, height: int, max_pixels: int) -> str:
    return (f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(data.max_image_pixels; a guard against decompression bombs); raise it to read "
            "this image, or shrink the file")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
