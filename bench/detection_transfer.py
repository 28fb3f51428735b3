"""Does a classifier's training carry over to a detector built on its features? Offline, on a
CPU: the quickstart's source classifier (a ResNet-18 finetune trains on the digits 0-4 at
32 px, `recipe=digits_source`) becomes the backbone of a Faster R-CNN (its layer2-layer4
through an FPN, finetune/models/detectors.py) that learns to find the digits 5-9 pasted onto
canvases (finetune/data/canvases.py); the same detector from a random backbone, the same
epochs, data and seed, beside it. COCO mAP@0.5 and mAP on held-out canvases (faster-coco-eval).

    python bench/detection_transfer.py            # the figures in BENCHMARKS.md
    python bench/detection_transfer.py --smoke    # tiny, no figures

A plain PyTorch loop over the detection building blocks (box datasets, detectors, the
task's metric); prints a Markdown table, --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report

from finetune.data.box_datasets import BoxDataset, box_transform, canvas_items, collate_boxes
from finetune.data.canvases import digit_canvases
from finetune.models.detectors import backbone_of, detector_on
from finetune.tasks.detection import Detection
from finetune.training.freezing import apply_freeze, keep_eval, plan_freeze

DIGITS = [5, 6, 7, 8, 9]
NAMES = [str(d) for d in DIGITS]


def source_classifier(smoke: bool) -> dict[str, torch.Tensor]:
    """The digits_source recipe's weights, trained by finetune as the quickstart does."""
    overrides = ["recipe=digits_source"] + (["trainer.max_epochs=1",
                                             "trainer.limit_train_batches=2"] if smoke else [])
    run = framework_run(overrides)
    return load_file(Path(run["run_dir"]) / "model.safetensors")


def detector(weights: dict[str, torch.Tensor] | None, size: int, seed: int
             ) -> torch.nn.Module:
    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18(num_classes=5)
    if weights is not None:
        resnet.load_state_dict(weights)
    # torchvision's sampling is sized for 800 px photos (512 RoIs an image, 2,000 proposals);
    # a canvas holds at most three digits, and RoI align's backward dominates a CPU step
    return detector_on(backbone_of(resnet, ["layer2", "layer3", "layer4"], size),
                       "fasterrcnn", len(NAMES), min_size=size, max_size=size,
                       box_batch_size_per_image=64, rpn_pre_nms_top_n_train=600,
                       rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                       rpn_post_nms_top_n_test=100)


def fit_and_measure(model: torch.nn.Module, data: BoxDataset, val: DataLoader,
                    epochs: int, seed: int, frozen: bool) -> tuple[dict[str, float], float]:
    """Both arms of a seed draw the same batches in the same order. `frozen`: the
    classifier's stages as they are, BatchNorm statistics too (finetune's freeze plan, as
    freeze.train_from=backbone.fpn); the FPN and the heads train."""
    plan = plan_freeze(model, "backbone.fpn" if frozen else None)
    apply_freeze(model, plan)
    train = DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate_boxes,
                       generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    started = time.perf_counter()
    torch.manual_seed(seed + 1)
    for _ in range(epochs):
        model.train()
        keep_eval(model, plan.eval_modules)
        for images, targets in train:
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    metric = Detection().metric_set(len(NAMES))["map"]
    model.eval()
    with torch.no_grad():
        for images, targets in val:
            metric.update(model(images), targets)
    result = metric.compute()
    return {k: float(result[k]) for k in ("map_50", "map")}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=160, help="training canvases")
    parser.add_argument("--val", type=int, default=80, help="held-out canvases")
    parser.add_argument("--size", type=int, default=96, help="canvas side in pixels")
    parser.add_argument("--frozen", action="store_true",
                        help="train the FPN and the heads only, the backbone as it is")
    parser.add_argument("--seeds", type=int, default=1, help="repeats (detector init, "
                        "batch order); the figures are medians")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.train, args.val, args.size = 1, 4, 2, 64
    canvases = digit_canvases(args.train, size=args.size, digits=DIGITS, scales=(3, 4), seed=0)
    held_out = digit_canvases(args.val, size=args.size, digits=DIGITS, scales=(3, 4), seed=1,
                              start=120)  # other images of each digit
    train = BoxDataset(canvas_items(canvases, NAMES), box_transform(True))
    val = DataLoader(BoxDataset(canvas_items(held_out, NAMES), box_transform(False)),
                     batch_size=8, collate_fn=collate_boxes)
    rows = []
    for name, weights in (("the digits classifier (0-4)", source_classifier(args.smoke)),
                          ("random", None)):
        runs = [fit_and_measure(detector(weights, args.size, seed), train, val, args.epochs,
                                seed, args.frozen) for seed in range(args.seeds)]
        each = {k: [found[k] for found, _ in runs] for k in ("map_50", "map")}
        rows.append([name, f"{median(each['map_50']):.3f}", f"{median(each['map']):.3f}",
                     f"{median([s for _, s in runs]):.0f}",
                     " ".join(f"{v:.3f}" for v in each["map_50"])])
    report(f"Faster R-CNN (ResNet-18 FPN) on digit canvases 5-9, {args.size} px, "
           f"{args.train} training canvases, {args.epochs} epochs, {args.val} held out"
           + (", the backbone frozen" if args.frozen else "")
           + f"; medians of {args.seeds} seed(s)",
           ["backbone", "mAP@0.5", "mAP", "train seconds", "mAP@0.5 of each seed"], rows,
           args.out)


if __name__ == "__main__":
    main()
