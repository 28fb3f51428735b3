"""The decoded-image cache: image-folder epochs after the first, with it and without.

An image folder written from the digits as 256x256 JPEGs (photos are larger than the
training resolution; decoding and resizing them is what the cache saves), trained at 32 and
64 px: steady-state training images/s (metrics.json's train_images_per_second: the first
epoch, where the cache is filled, is left out) with data.decode_cache=false and true, and
the final val/acc of both (the same tensors: it must be the same).

    python bench/decoded.py --sizes 32 --workers 0,2,auto   # the figures in BENCHMARKS.md
    python bench/decoded.py --matrix --sizes 32,64,128 --workers 0,2 --epochs 3
                                         # end to end, auto against false, every cell
    python bench/decoded.py --matrix --loader-only --side 1024 --sizes 64,224
                                         # the loader alone, photo-sized files
    python bench/decoded.py --smoke      # CI: tiny, no figures

Prints a Markdown table (medians of --repeats runs); --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report


def jpeg_folder(root: Path, per_class: int, side: int, suffix: str = "jpg") -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for k in np.flatnonzero(digits.target == digit)[:per_class]:
            pixels = np.round(digits.images[k] * 255 / 16).astype(np.uint8)
            image = Image.fromarray(pixels).resize((side, side), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{k}.{suffix}", **({"quality": 90} if suffix == "jpg" else {}))
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


def timed_run(overrides: list[str]) -> tuple[float, dict[str, Any]]:
    """Wall time of `python -m finetune OVERRIDES` from launch to exit, with a
    $FINETUNE_HOME of its own (an empty decoded-image cache: every run pays its own
    decoding, as a user's first run on a folder does); its metrics."""
    home, before = tempfile.mkdtemp(prefix="bench-home-"), os.environ.get("FINETUNE_HOME")
    os.environ["FINETUNE_HOME"] = home
    started = time.perf_counter()
    try:
        metrics = framework_run(overrides)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if before is None:
            os.environ.pop("FINETUNE_HOME", None)
        else:
            os.environ["FINETUNE_HOME"] = before
    return time.perf_counter() - started, metrics


def matrix(a: argparse.Namespace) -> None:
    """End to end, `data.decode_cache=auto` (what a run chooses) against `false`, in every
    cell of workers x frozen backbone or not x image size x PNG or JPEG; and the loader
    alone with the cache on and off per size and format."""
    per_class, sizes, workers = (6, [16], ["0"]) if a.smoke else (
        a.per_class, [int(x) for x in a.sizes.split(",")], a.workers.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    folders = {kind: jpeg_folder(work / kind, per_class, a.side, suffix)
               for kind, suffix in (("PNG", "png"), ("JPEG", "jpg"))}
    backbones = {"frozen backbone (train_from=fc)": ["freeze.train_from=fc",
                                                      "data.augment=[]"],
                 "trained end to end": []}
    rows, loader_rows = [], []
    for kind, root in folders.items():
        for size in sizes:
            for label, extra in backbones.items() if not a.loader_only else ():
                for count in workers:
                    walls: dict[str, list[float]] = {"false": [], "auto": []}
                    chosen = ""
                    for _ in range(1 if a.smoke else a.repeats):
                        for setting in ("false", "auto"):
                            wall, metrics = timed_run([
                                "recipe=base", "weights.source=none", "data=imagefolder",
                                f"data.root={root}", f"data.image_size={size}",
                                "data.batch_size=32", f"trainer.max_epochs={a.epochs}",
                                f"data.decode_cache={setting}", f"data.num_workers={count}",
                                "checkpoint.keep=none", "eval.report=false", *extra])
                            walls[setting].append(wall)
                            if setting == "auto":
                                chosen = metrics.get("decode_cache", {}).get("status", "?")
                    off, auto = median(walls["false"]), median(walls["auto"])
                    rows.append([kind, f"{size} px", label, count, f"{off:.1f}", chosen,
                                 f"{auto:.1f}", f"**{off / auto:.2f}x**"])
                    print(rows[-1], flush=True)
            if not a.smoke:
                loader = [median([loader_rate(root, size, setting) for _ in range(a.repeats)])
                          for setting in ("false", "true")]
                loader_rows.append([kind, f"{size} px", f"{loader[0]:.0f}", f"{loader[1]:.0f}",
                                    f"**{loader[1] / loader[0]:.2f}x**"])
    source = f"{a.side}x{a.side} digit images, {10 * per_class} in all"
    report(f"Decoded-image cache, the training loader alone ({source}; "
           "python bench/decoded.py --matrix)",
           ["format", "input", "images/s without", "images/s with", "speed-up"],
           loader_rows, a.out)
    if a.loader_only:
        return
    report(f"Decoded-image cache end to end: data.decode_cache=auto against false, command "
           f"wall time ({source}, {a.epochs} epochs; python bench/decoded.py --matrix)",
           ["format", "input", "backbone", "data.num_workers", "false s", "auto chose",
            "auto s", "speed-up"], rows, a.out)


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
    parser.add_argument("--matrix", action="store_true",
                        help="end to end, auto against false, in every cell (workers x frozen "
                             "or not x --sizes x PNG and JPEG)")
    parser.add_argument("--loader-only", action="store_true",
                        help="with --matrix: the loader-alone table only")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--side", type=int, default=256, help="the image files' side, px")
    a = parser.parse_args()
    if a.matrix:
        matrix(a)
        return
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
