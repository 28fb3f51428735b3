"""The decoded-image cache: image files decoded once to uint8 at the training resolution.

Every epoch of an image-folder or CSV run decodes each JPEG / PNG again, then resizes and
crops it, before the random augmentation; for small training resolutions that is most of an
epoch's time. With `data.decode_cache` the deterministic part (decode, grayscale, resize,
center crop: what every epoch computes the same) is done once, into one (N, C, H, W) uint8
array stored in finetune's own cache ($FINETUNE_HOME/decoded/), memory-mapped by every later
epoch and every later run that reads the same files at the same resolution (the other jobs of
a sweep). The augmentations and the normalization still run per item, so a cached run sees
bit for bit the tensors an uncached one sees (tested).

Keyed by every file's path, size and modification time and by the resize, crop,
interpolation, channels and pixel limit: a changed file or setting is another key. Written to
a temporary file and moved into place (concurrent writers each write their own, the last move
wins, both complete); a record beside it holds the array's sha256, checked before it is used,
so a damaged or replaced file is decoded again, not read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from finetune.compose import safe_files
from finetune.data.images import open_rgb
from finetune.errors import FinetuneError
from finetune.locations import cache_dir
from finetune.models.backbones import Preprocessing
from finetune.rundir import artifacts

log = logging.getLogger("finetune")
FORMAT = 1
AUTO_LIMIT_BYTES = 4 << 30  # `auto` caches a data set up to this size once decoded


def cache_folder() -> Path:
    return cache_dir("decoded")


def key_of(paths: list[Path], prep: Preprocessing, max_pixels: int) -> str:
    """The cache key: every file (path, size, mtime) and the deterministic transform."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT, "resize": prep.resize, "crop": prep.crop,
                              "interpolation": prep.interpolation, "channels": prep.channels,
                              "max_pixels": max_pixels}, sort_keys=True).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decide(setting: Any, count: int, prep: Preprocessing, epochs: int = 1,
           features_cached: bool = False) -> tuple[bool, str]:
    """data.decode_cache: whether this run decodes its image files once into the cache, and
    why (for the log and metrics.json). true and false are obeyed; auto caches only where it
    saves work: the run reads the images more than once (a one-epoch run, or one whose frozen
    prefix's features are computed once from the images (freeze.cache), reads each image once:
    decoding them into the cache first would add a write and a read) and the decoded set is
    at most 4 GiB."""
    mode = str(setting).lower()
    if mode not in ("auto", "true", "false"):
        raise FinetuneError(f"data.decode_cache={setting!r}: use auto, true or false")
    size = count * prep.channels * prep.crop * prep.crop
    held = f"{count:,} images, {size / 2**20:,.1f} MB decoded at {prep.crop} px"
    if mode == "false":
        return False, "off (data.decode_cache=false)"
    if mode == "true":
        return True, f"on (data.decode_cache=true): {held}"
    if epochs <= 1:
        return False, ("off: a one-epoch run reads each image once; decoding them into the "
                       "cache first would not save work (data.decode_cache=true forces it)")
    if features_cached:
        return False, ("off: the frozen prefix's features are computed once from the images "
                       "(freeze.cache), so each image is read once (data.decode_cache=true "
                       "forces it)")
    if size > AUTO_LIMIT_BYTES:
        return False, (f"off: {held}, over auto's {AUTO_LIMIT_BYTES >> 30} GiB "
                       "(data.decode_cache=true forces it)")
    return True, f"on (auto): {epochs} epochs read {held}"


def _record(key: str) -> Path:
    return cache_folder() / f"{key}.json"


def _array_file(key: str) -> Path:
    return cache_folder() / f"{key}.u8"


def _load(key: str, count: int, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The stored array, memory-mapped, when its record names this shape and its sha256
    still matches; else None (it is decoded again)."""
    record, data = _record(key), _array_file(key)
    if not record.is_file() or not data.is_file():
        return None
    try:
        entry = safe_files.load_json_object(record, "decoded-image record")
    except FinetuneError:
        return None
    if entry.get("shape") != [count, *shape] or entry.get("sha256") != artifacts.file_sha256(
            data):
        log.warning("data: the decoded-image cache %s does not match its record; decoding "
                    "again", data)
        return None
    return np.memmap(data, dtype=np.uint8, mode="r", shape=(count, *shape))


def decode_all(paths: list[Path], first: Any, max_pixels: int, shape: tuple[int, int, int]
               ) -> np.ndarray:
    """Every image through the deterministic transform `first` (threads: PIL and the resize
    release the GIL)."""

    out = np.empty((len(paths), *shape), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = first(open_rgb(paths[i], max_pixels)).numpy()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths))))
    return out


def decoded(paths: list[Path], prep: Preprocessing, first: Any, max_pixels: int
            ) -> np.ndarray:
    """The (N, C, crop, crop) uint8 array of `paths` after `first`: from the cache when it
    holds them, else decoded now and stored."""
    shape = (prep.channels, prep.crop, prep.crop)
    key = key_of(paths, prep, max_pixels)
    found = _load(key, len(paths), shape)
    if found is not None:
        log.info("data: %d images from the decoded-image cache (%s)", len(paths),
                 _array_file(key))
        return found
    array = decode_all(paths, first, max_pixels, shape)
    target = _array_file(key)
    try:  # whole or absent, as every file finetune writes
        artifacts.write_stream(target, array.tofile)
        artifacts.write_json(_record(key), {"shape": list(array.shape), "count": len(paths),
                                            "sha256": artifacts.file_sha256(target)})
    except artifacts.DiskFull:
        log.warning("data: no space left to store the decoded images in %s; this run keeps "
                    "them in memory, later runs decode again (free some space there, or set "
                    "data.decode_cache=false)", target.parent)
        return array
    log.info("data: %d images decoded once into %s", len(paths), target)
    # memory-mapped, as a later run reads it: loader workers share its pages
    return np.memmap(target, dtype=np.uint8, mode="r", shape=array.shape)


class Rows:
    """Images of the decoded array by row: what a dataset's `load` returns for item i."""

    def __init__(self, array: np.ndarray, rows: list[int]) -> None:
        self.array, self.rows = array, rows

    def __getstate__(self) -> dict[str, Any]:
        """A loader worker started by spawn (macOS, Windows) maps the cached file again
        instead of receiving a copy of the whole array."""
        array = self.array
        if isinstance(array, np.memmap) and array.filename:
            return {"file": array.filename, "shape": array.shape, "rows": self.rows}
        return {"array": array, "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.rows = state["rows"]
        self.array = state["array"] if "array" in state else np.memmap(
            state["file"], dtype=np.uint8, mode="r", shape=tuple(state["shape"]))

    def __call__(self, i: int) -> tv_tensors.Image:
        return tv_tensors.Image(torch.from_numpy(np.array(self.array[self.rows[i]])))
