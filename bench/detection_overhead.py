"""A detector's training speed: `python -m finetune recipe=digits_detection` (or
digits_instances: a Mask R-CNN and its masks) against a hand-written torchvision loop on the
same detector and data.

Both train the same Faster R-CNN (the recipe's ResNet-18 with an FPN on layer2-layer4, from
the same random initial weights: the plan builds it under the same seed) on the same digit
canvases through the same transform, in the same order (finetune's seeded epoch order), with
the same batch size, threads and optimizer (SGD at the recipe's lr, momentum 0.9, weight decay
1e-4 on weights and none on biases and norms, constant lr; the gradient's norm clipped where
the recipe clips it). Both count steady-state images/s the
same way: the first epoch and the first batch of each epoch left out, validation never
counted. The training losses are compared at every step the framework logs.

    python bench/detection_overhead.py            # the figures in BENCHMARKS.md
    python bench/detection_overhead.py --smoke    # tiny, no figures
    python bench/detection_overhead.py --recipe digits_instances --canvases 120

Prints a Markdown table (medians of --repeats runs); --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_losses, framework_run, median, report

from finetune.compose.prepare import compose_config
from finetune.data.box_datasets import collate_boxes
from finetune.data.datamodule import EpochShuffle
from finetune.training.plan import plan_run


def args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits_detection",
                        help="digits_detection | digits_instances")
    parser.add_argument("--canvases", type=int, default=240, help="2/3 of them train")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", type=Path)
    return parser


def overrides(a: argparse.Namespace) -> list[str]:
    return [f"recipe={a.recipe}", "weights.source=none", "seed=0",
            f"data.canvases.count={a.canvases}", f"data.canvases.size={a.size}",
            f"data.batch_size={a.batch}", "data.num_workers=0", "trainer.max_epochs=2",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


def plain_loop(a: argparse.Namespace) -> tuple[float, list[float]]:
    """What a person writes by hand around torchvision's detector: its loss dict summed,
    backward, step. Returns (steady images/s, loss per step)."""
    cfg, _ = compose_config(overrides(a))
    plan = plan_run(cfg, load=False)  # the same detector, initial weights and datasets
    assert not plan.problems, plan.problems
    model, dataset = plan.built.model.train(), plan.data.train_set
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr,
                                momentum=0.9)
    clip = cfg.trainer.gradient_clip_val  # the recipe's (digits_instances clips at 5)
    losses: list[float] = []
    seconds = images = 0.0
    for epoch in range(2):
        order = list(EpochShuffle(len(dataset), cfg.seed, epoch))
        start = 0.0
        for b, first in enumerate(range(0, len(order), a.batch)):
            images_, targets = collate_boxes([dataset[key] for key in order[first:first + a.batch]])
            loss = sum(model(images_, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(decay + rest, clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if epoch == 1:
                if b == 0:
                    start = time.perf_counter()
                else:
                    images += len(images_)
        if epoch == 1:
            seconds = time.perf_counter() - start
    return images / seconds, losses


def main() -> None:
    a = args_parser().parse_args()
    if a.smoke:
        a.canvases, a.size, a.batch, a.repeats = 18, 48, 4, 1
    plain, framework, curve, waits = [], [], [], []
    for _ in range(a.repeats):
        rate, losses = plain_loop(a)
        plain.append(rate)
        metrics = framework_run(overrides(a))
        framework.append(metrics["train_images_per_second"])
        waits.append(metrics["input_wait_share"])
        theirs = framework_losses(metrics["run_dir"])
        # the framework logs the loss of step s (0-based) at global step s + 1
        curve.append(max(abs(losses[step - 1] - loss) for step, loss in theirs.items()
                         if 0 < step <= len(losses)))
    kind = "Mask R-CNN" if a.recipe == "digits_instances" else "Faster R-CNN"
    report(f"Detector overhead: {kind} (ResNet-18 FPN) on {a.size} px canvases, batch "
           f"{a.batch}, CPU",
           ["plain loop img/s", "framework img/s", "ratio", "max loss difference (per step)",
            "framework input wait", "runs"],
           [[f"{median(plain):.1f}", f"{median(framework):.1f}",
             f"{median(framework) / median(plain):.3f}", f"{max(curve):.2e}",
             f"{100 * median(waits):.1f}%", a.repeats]],
           a.out)


if __name__ == "__main__":
    main()
