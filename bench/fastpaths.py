"""Fast paths as config: trainer.precision, model.channels_last, model.compile, each one
key on a `python -m finetune` run; steady-state training images/s from metrics.json.

    python bench/fastpaths.py                                   # CPU, resnet18 64 px
    python bench/fastpaths.py --device cuda --model resnet50 --size 224 --batch 64
    python bench/fastpaths.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report

SETTINGS = {
    "cpu": [("32-true", False, False), ("bf16-mixed", False, False),
            ("32-true", True, False), ("32-true", False, True)],
    "cuda": [("32-true", False, False), ("16-mixed", False, False),
             ("bf16-mixed", False, False), ("bf16-mixed", True, False),
             ("bf16-mixed", True, True)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    settings = SETTINGS[a.device]
    if a.smoke:
        a.size, a.batch, a.batches, a.repeats = 16, 8, 4, 1
        # one setting: the smoke run checks the script, not speed. Not bf16-mixed: on CPU
        # (torch 2.14.1) its loss turns NaN in some runs, nondeterministically, and the run
        # then stops (BENCHMARKS.md section 5).
        settings = settings[:1]
    accelerator = "gpu" if a.device == "cuda" else "cpu"
    rows, base = [], None
    for precision, channels_last, compiled in settings:
        rates = [framework_run([
            f"model.name={a.model}", "data=fake", "data.fake_classes=4",
            f"data.image_size={a.size}",
            f"data.batch_size={a.batch}", f"data.fake_size={int(a.batch * a.batches / 0.8) + 1}",
            "trainer.max_epochs=2", "trainer.limit_val_batches=1",
            f"trainer.accelerator={accelerator}", "trainer.devices=1",
            f"trainer.precision={precision}", f"model.channels_last={channels_last}",
            f"model.compile={compiled}"])["train_images_per_second"] for _ in range(a.repeats)]
        rate = median(rates)
        base = base or rate
        rows.append([precision, channels_last, compiled, f"{rate:.1f}", f"{rate / base:.2f}"])
    report(f"Fast paths: {a.model} {a.size}px batch {a.batch}, {a.device}",
           ["trainer.precision", "model.channels_last", "model.compile", "images/s",
            "vs first row"], rows, a.out)


if __name__ == "__main__":
    main()
