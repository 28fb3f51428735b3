"""What COCO mAP costs per 1,000 images, with both of torchmetrics' backends.

The detections are what a trained detector returns: per image up to 100 boxes (torchvision's
`box_detections_per_img`), a few near each true box with high scores and the rest scattered
with low ones, over `--classes` classes and 1-5 true boxes per image; the same seeded set for
both backends. Timed: MeanAveragePrecision(iou_type="bbox", class_metrics=True) — the metric
finetune validates and evaluates with — update on every image, then compute; medians of
--repeats. The figures of both backends are compared too (they should agree to 1e-4).

    python bench/detection_eval.py                # the figures in BENCHMARKS.md
    python bench/detection_eval.py --smoke        # tiny, no figures

Prints a Markdown table; --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torchmetrics.detection import MeanAveragePrecision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, report


def args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-image", type=int, default=100, help="detections per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", type=Path)
    return parser


def detections(a: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(found, truth) per image, seeded: boxes in a 640 x 480 image."""
    g = torch.Generator().manual_seed(0)
    found, truth = [], []
    for _ in range(a.images):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([540.0, 380.0])
        wh = 20 + torch.rand(n, 2, generator=g) * 80
        true_boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, a.classes + 1, (n,), generator=g)
        near = true_boxes.repeat_interleave(3, 0) + torch.randn(3 * n, 4, generator=g) * 4
        near_labels = labels.repeat_interleave(3)
        rest = a.per_image - len(near)
        xy2 = torch.rand(rest, 2, generator=g) * torch.tensor([540.0, 380.0])
        scattered = torch.cat([xy2, xy2 + 20 + torch.rand(rest, 2, generator=g) * 80], 1)
        found.append({"boxes": torch.cat([near, scattered]),
                      "scores": torch.cat([0.5 + 0.5 * torch.rand(len(near), generator=g),
                                           0.5 * torch.rand(rest, generator=g)]),
                      "labels": torch.cat([near_labels,
                                           torch.randint(1, a.classes + 1, (rest,),
                                                         generator=g)])})
        truth.append({"boxes": true_boxes, "labels": labels})
    return found, truth


def timed(backend: str, found: list[dict], truth: list[dict]) -> tuple[float, dict]:
    metric = MeanAveragePrecision(iou_type="bbox", class_metrics=True, backend=backend)
    started = time.perf_counter()
    metric.update(found, truth)
    result = metric.compute()
    return time.perf_counter() - started, result


def main() -> None:
    a = args_parser().parse_args()
    if a.smoke:
        a.images, a.classes, a.per_image, a.repeats = 20, 3, 20, 1
    found, truth = detections(a)
    backends = [b for b in ("faster_coco_eval", "pycocotools")
                if importlib.util.find_spec(b) is not None]
    seconds: dict[str, list[float]] = {b: [] for b in backends}
    results = {}
    for _ in range(a.repeats):
        for backend in backends:
            spent, results[backend] = timed(backend, found, truth)
            seconds[backend].append(spent)
    keys = ("map", "map_50", "map_75", "mar_100")
    agree = max(abs(float(results[backends[0]][k]) - float(results[b][k]))
                for b in backends for k in keys)
    per_thousand = {b: median(s) * 1000 / a.images for b, s in seconds.items()}
    report(f"COCO mAP per 1,000 images: {a.images} images, {a.per_image} detections each, "
           f"{a.classes} classes",
           ["backend", "s per 1,000 images", "vs pycocotools", "mAP", "largest figure gap "
            "between backends", "runs"],
           [[b, f"{per_thousand[b]:.2f}",
             f"{per_thousand.get('pycocotools', per_thousand[b]) / per_thousand[b]:.2f}x",
             f"{float(results[b]['map']):.4f}", f"{agree:.1e}", a.repeats] for b in backends],
           a.out)


if __name__ == "__main__":
    main()
