"""The feature cache: training epochs of a head-only ResNet-18 on the digits with the frozen
prefix computed once (freeze.cache=true) against computing it every step (false).

    python bench/cache.py --epochs 6 --repeats 3 --out BENCHMARKS-cache.md
    python bench/cache.py --smoke

The epoch time is the steady state the run measured (ThroughputMeter: epochs after the
first, training batches only, validation left out): training images / train_images_per_second.
The one-time cost of the cache (computing the prefix for every train and val image) is shown
on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    parser.add_argument("--train-from", default="fc", help="freeze.train_from (fc: head only)")
    parser.add_argument("--smoke", action="store_true", help="tiny and once: checks it runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.repeats = 2, 1
    base = ["recipe=base", "data=digits", f"data.image_size={args.size}", "data.batch_size=64",
            "model.name=resnet18", "weights.source=none", f"freeze.train_from={args.train_from}",
            f"trainer.max_epochs={args.epochs}", "sched.name=cosine", "seed=0"]
    if args.smoke:
        base += ["data.classes=[0,1]"]
    runs: dict[str, list[dict]] = {"false": [], "true": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(framework_run([*base, f"freeze.cache={mode}"]))
    train_images = runs["false"][0]["train_images"]
    rows, epoch_seconds = [], {}
    for mode, results in runs.items():
        rates = [r["train_images_per_second"] for r in results]
        epoch_seconds[mode] = median([train_images / r for r in rates])
        built = [r["feature_cache"]["seconds"] for r in results
                 if r.get("feature_cache", {}).get("seconds") is not None]
        rows.append([
            "computed once (true)" if mode == "true" else "every step (false)",
            f"{median(rates):.0f}", f"{epoch_seconds[mode]:.3f}",
            f"{median(built):.2f}" if built else "-",
            f"{median([r['val/acc'] for r in results]):.4f}",
            f"{median([r['train_seconds'] for r in results]):.1f}",
        ])
    speedup = epoch_seconds["false"] / epoch_seconds["true"]
    rows.append(["speed-up of a steady epoch", "", f"{speedup:.1f}x", "", "", ""])
    report(f"Feature cache: resnet18 train_from={args.train_from}, digits {args.size} px, "
           f"{train_images} train images, batch 64, {args.epochs} epochs, medians of "
           f"{args.repeats}",
           ["frozen prefix", "train img/s (steady)", "epoch s (steady)", "cache build s",
            "val/acc", "fit s (all epochs, with validation)"], rows, args.out)


if __name__ == "__main__":
    main()
