"""The test split, calibration and the report, measured on real data.

Two data sets: the digits quickstart (digits 5-9 from the digits_source weights,
data.test_fraction=0.2) and an image folder of PNGs written from the digits 0-9
(train/, val/, test/ folders). For each: test accuracy, macro F1 and the ECE (15 bins) of
the trained run, then `finetune.evaluate calibrate=true` (a temperature fitted on the
validation split) and the test ECE and NLL after it. Then the seconds the report adds to a
run: the same run with eval.report=true and false, wall time of the whole command, medians.

    python bench/evaluation.py                 # the figures in BENCHMARKS.md
    python bench/evaluation.py --smoke         # CI: tiny, no figures

Prints Markdown tables; --out FILE appends them there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report


def digit_folder(root: Path, per_class: int) -> Path:
    """digits 0-9 as PNGs (8x8 upscaled to 16x16): train/val/test = 60/20/20 % of each."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        index = np.flatnonzero(digits.target == digit)[:per_class]
        cut = [int(len(index) * 0.6), int(len(index) * 0.8)]
        for i, k in enumerate(index):
            split = "train" if i < cut[0] else "val" if i < cut[1] else "test"
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[k] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16), Image.NEAREST).save(folder / f"{k}.png")
    return root


def calibrate(run_dir: str) -> dict:
    from finetune.commands.evaluate import evaluate_run

    result, _ = evaluate_run(run_dir, calibrate=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    tiny = ["trainer.max_epochs=1", "trainer.limit_train_batches=2"] if a.smoke else []
    folder = digit_folder(Path(tempfile.mkdtemp(prefix="bench-digits-")), 20 if a.smoke else 400)
    setups = {
        "digits quickstart (5-9, test_fraction 0.2)": [
            "recipe=quickstart", "data.test_fraction=0.2", *tiny],
        "digit PNG folder (0-9, train/val/test)": [
            "recipe=base", "data=imagefolder", f"data.root={folder}", "data.image_size=32",
            "trainer.max_epochs=4", "optim.lr=2e-3", *tiny],
    }
    rows = []
    for name, overrides in setups.items():
        metrics = framework_run(overrides)
        after = calibrate(metrics["run_dir"])
        rows.append([name, metrics["test/images"], f"{metrics['test/acc']:.4f}",
                     f"{metrics['test/macro/f1']:.4f}", f"{metrics['test/ece']:.4f}",
                     f"{after['uncalibrated']['loss']:.4f}",
                     f"{after['temperature']:.3f}", f"{after['ece']:.4f}",
                     f"{after['loss']:.4f}"])
    report("Test split and temperature scaling (python bench/evaluation.py)",
           ["data", "test images", "test acc", "macro F1", "ECE", "NLL",
            "temperature (fit on val)", "ECE after", "NLL after"], rows, a.out)
    repeats = 1 if a.smoke else a.repeats
    seconds = {}
    for setting in ("false", "true"):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            framework_run(["recipe=quickstart", "data.test_fraction=0.2",
                           f"eval.report={setting}", *tiny])
            times.append(time.perf_counter() - started)
        seconds[setting] = median(times)
    report("What report.html adds to a run (python bench/evaluation.py)",
           ["run", "eval.report=false s", "eval.report=true s", "added s"],
           [["quickstart, test_fraction 0.2, whole command", f"{seconds['false']:.2f}",
             f"{seconds['true']:.2f}", f"{seconds['true'] - seconds['false']:.2f}"]], a.out)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
