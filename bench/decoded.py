"""The decoded-image cache: image-folder epochs after the first, with it and without.

An image folder written from the digits as 256x256 JPEGs (photos are larger than the
training resolution; decoding and resizing them is what the cache saves), trained at 32 and
64 px: steady-state training images/s (metrics.json's train_images_per_second: the first
epoch, where the cache is filled, is left out) with data.decode_cache=false and true, and
the final val/acc of both (the same tensors: it must be the same).

    python bench/decoded.py --sizes 32 --workers 0,2,auto   # the figures in BENCHMARKS.md
    python bench/decoded.py --smoke      # CI: tiny, no figures

Prints a Markdown table (medians of --repeats runs); --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report


def jpeg_folder(root: Path, per_class: int, side: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for k in np.flatnonzero(digits.target == digit)[:per_class]:
            pixels = np.round(digits.images[k] * 255 / 16).astype(np.uint8)
            image = Image.fromarray(pixels).resize((side, side), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{k}.jpg", quality=90)
    return root


def loader_rate(root: Path, size: int, setting: str, epochs: int = 2) -> float:
    """Images/s of the training loader alone (no model): the input pipeline's own rate, in
    the epoch after the first."""
    import time

    from finetune.compose.prepare import compose_config
    from finetune.data.datamodule import build_datamodule
    from finetune.training.plan import preprocessing_for

    cfg, _ = compose_config(["weights.source=none", "data=imagefolder", f"data.root={root}",
                             f"data.image_size={size}", "data.batch_size=32",
                             f"data.decode_cache={setting}"])
    data = build_datamodule(cfg.data, preprocessing_for(cfg), cfg.seed)
    rate = 0.0
    for epoch in range(epochs):
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        started, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images)
        rate = count / (time.perf_counter() - started)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-from", default=None,
                        help="freeze.train_from (e.g. fc: a frozen backbone, forward only: "
                             "the input pipeline is then what limits an epoch)")
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--workers", default="auto",
                        help="data.num_workers values to measure, comma-separated (0,2,auto)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    per_class, sizes = (6, [32]) if a.smoke else (120, [int(x) for x in a.sizes.split(",")])
    frozen = [f"freeze.train_from={a.train_from}", "freeze.cache=false"] if a.train_from else []
    repeats, epochs = (1, 2) if a.smoke else (a.repeats, a.epochs)
    root = jpeg_folder(Path(tempfile.mkdtemp(prefix="bench-jpegs-")), per_class, 256)
    rows = []
    for size in sizes:
        for workers in a.workers.split(","):
            rates: dict[str, list[float]] = {"false": [], "true": []}
            accs: dict[str, list[float]] = {"false": [], "true": []}
            for _ in range(repeats):
                for setting in ("false", "true"):
                    metrics = framework_run([
                        "recipe=base", "data=imagefolder", f"data.root={root}",
                        f"data.image_size={size}", "data.batch_size=32",
                        f"trainer.max_epochs={epochs}", f"data.decode_cache={setting}",
                        f"data.num_workers={workers}", "checkpoint.keep=none",
                        "eval.report=false", *frozen])
                    rates[setting].append(metrics["train_images_per_second"])
                    accs[setting].append(metrics["val/acc"])
            off, on = median(rates["false"]), median(rates["true"])
            label = f"{size} px" + (f", train_from={a.train_from}" if a.train_from else "")
            rows.append([label, workers, f"{off:.1f}", f"{on:.1f}", f"{on / off:.2f}x",
                         f"{median(accs['false']):.4f}", f"{median(accs['true']):.4f}"])
    loader_rows = []
    for size in sizes:
        off = median([loader_rate(root, size, "false") for _ in range(repeats)])
        on = median([loader_rate(root, size, "true") for _ in range(repeats)])
        loader_rows.append([f"{size} px", f"{off:.0f}", f"{on:.0f}", f"{on / off:.2f}x"])
    report("Decoded-image cache: the training loader alone, epoch after the first "
           "(python bench/decoded.py)", ["input", "images/s without", "images/s with",
                                         "speed-up"], loader_rows, a.out)
    report("Decoded-image cache: epochs after the first (python bench/decoded.py)",
           ["input", "data.num_workers", "images/s without", "images/s with", "speed-up",
            "val/acc without", "val/acc with"], rows, a.out)


if __name__ == "__main__":
    main()
