"""uint8 batches (data.uint8_batches): the same run with images normalized in the loader and
with uint8 batches normalized on the training device.

Three inputs: the digits in memory (a tensor the framework transforms once before the run),
an image folder of 256 px JPEGs read through the decoded-image cache, and the same folder
decoded every epoch. Each is trained with data.uint8_batches=false and true from the same
seed: steady-state training images/s and input-wait share (metrics.json), and val/acc, which
must be equal (the same tensors reach the model).

    python bench/uint8.py                          # CPU: the figures in BENCHMARKS.md
    python bench/uint8.py --device cuda --model resnet50 --size 224 --precision bf16-mixed
    python bench/uint8.py --smoke                  # CI: tiny, no figures

Prints a Markdown table (medians of --repeats runs); --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report
from decoded import jpeg_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=120, help="JPEGs per digit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    if a.smoke:
        a.size, a.batch, a.epochs, a.per_class, a.repeats = 16, 8, 2, 6, 1
    root = jpeg_folder(Path(tempfile.mkdtemp(prefix="bench-uint8-")), a.per_class, 256)
    common = [f"model.name={a.model}", "weights.source=none", f"data.image_size={a.size}",
              f"data.batch_size={a.batch}", f"trainer.max_epochs={a.epochs}",
              f"trainer.accelerator={'gpu' if a.device == 'cuda' else 'cpu'}",
              "trainer.devices=1", f"trainer.precision={a.precision}",
              "checkpoint.keep=none", "eval.report=false",
              *(["trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
                if a.smoke else [])]
    inputs = {"digits in memory": ["data=digits"],
              "JPEG folder, decoded cache": ["data=imagefolder", f"data.root={root}",
                                             "data.decode_cache=true"],
              "JPEG folder, decoded each epoch": ["data=imagefolder", f"data.root={root}",
                                                  "data.decode_cache=false"]}
    rows = []
    for name, data in inputs.items():
        rates: dict[str, list[float]] = {"false": [], "true": []}
        waits: dict[str, list[float]] = {"false": [], "true": []}
        accs: dict[str, list[float]] = {"false": [], "true": []}
        for _ in range(a.repeats):
            for setting in ("false", "true"):
                metrics = framework_run([*common, *data, f"data.uint8_batches={setting}"])
                rates[setting].append(metrics["train_images_per_second"])
                waits[setting].append(metrics["input_wait_share"] or 0.0)
                accs[setting].append(metrics["val/acc"])
        off, on = median(rates["false"]), median(rates["true"])
        rows.append([name, f"{off:.1f}", f"{on:.1f}", f"{on / off:.3f}",
                     f"{100 * median(waits['false']):.1f}% / {100 * median(waits['true']):.1f}%",
                     f"{median(accs['false']):.4f} / {median(accs['true']):.4f}"])
    report(f"uint8 batches: {a.model} {a.size} px batch {a.batch}, {a.device}, {a.precision} "
           "(python bench/uint8.py)",
           ["input", "img/s normalized in the loader", "img/s uint8 batches", "ratio",
            "input wait (loader / uint8)", "val/acc (loader / uint8)"], rows, a.out)


if __name__ == "__main__":
    main()
