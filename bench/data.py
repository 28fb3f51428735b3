"""The image-folder pipeline: decode + the framework's train transform, images/s by worker
count, for JPEG and PNG files, through the framework's own dataset and loader settings.

    python bench/data.py --images 512 --size 224           # workers 0, 1, 2, ... cores
    python bench/data.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, report


def write_images(root: Path, count: int, side: int, suffix: str) -> list[Path]:
    """Photo-like images (smooth gradients + noise) so that compression is realistic."""
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(count):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy + i), xx * yy], -1) * 90 + 120
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = root / f"{i}{suffix}"
        Image.fromarray(pixels).save(path, quality=90) if suffix == ".jpg" else \
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def rate(paths: list[Path], size: int, workers: int, batch: int) -> float:
    from finetune.data.datamodule import EpochShuffle, ImageFiles
    from finetune.data.transforms import train_transform
    from finetune.models.backbones import preprocessing

    prep = preprocessing(None, size)
    dataset = ImageFiles(paths, [0] * len(paths),
                         train_transform(prep, ["RandomResizedCrop", "RandomHorizontalFlip"]),
                         random=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch,
                                         sampler=EpochShuffle(len(paths), 0),
                                         num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: workers start, files enter the page cache
        pass
    start = time.perf_counter()
    count = sum(len(y) for _, y in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=320, help="stored image side, px")
    parser.add_argument("--size", type=int, default=224, help="training crop, px")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="*")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    if a.smoke:
        a.images, a.side, a.size, a.batch, a.repeats, a.workers = 16, 48, 32, 8, 1, [0, 1]
    cores = os.cpu_count() or 1
    workers = a.workers if a.workers is not None else sorted(
        {0, 1, 2, max(1, cores // 2), max(1, cores - 1)})
    from finetune.data.datamodule import loader_workers

    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    for suffix in (".jpg", ".png"):
        folder = root / suffix[1:]
        folder.mkdir()
        paths = write_images(folder, a.images, a.side, suffix)
        for n in workers:
            per_second = median([rate(paths, a.size, n, a.batch) for _ in range(a.repeats)])
            rows.append([suffix[1:].upper(), n, f"{per_second:.0f}",
                         f"{per_second / max(1, n):.0f}"])
    report(f"Image-folder pipeline: {a.side}px files -> RandomResizedCrop {a.size} + flip + "
           f"normalize, batch {a.batch} (data.num_workers=auto picks "
           f"{loader_workers('auto', False)} here)",
           ["format", "workers", "images/s", "images/s per worker"], rows, a.out)


if __name__ == "__main__":
    main()
