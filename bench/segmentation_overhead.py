"""A segmentation run's training speed: `python -m finetune recipe=digits_segmentation`
against a hand-written PyTorch loop on the same model and data.

Both train the same DeepLabv3 head on the recipe's ResNet-18 (cut after layer2; from the same
random initial weights: the plan builds it under the same seed) on the same digit canvases
through the same transform, in the same order (finetune's seeded epoch order), with the same
batch size, threads and optimizer (AdamW, lr 2e-3, weight decay 1e-4 on weights and none on
biases and norms, constant lr). Both count steady-state images/s the same way: the first
epoch and the first batch of each epoch left out, validation never counted. The training
losses are compared at every step the framework logs.

    python bench/segmentation_overhead.py            # the figures in BENCHMARKS.md
    python bench/segmentation_overhead.py --smoke    # tiny, no figures

Prints a Markdown table (medians of --repeats runs); --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_losses, framework_run, median, report

from finetune.compose.prepare import compose_config
from finetune.data.datamodule import EpochShuffle
from finetune.seeding import seed_epoch
from finetune.tasks.segmentation import IGNORED
from finetune.training.plan import plan_run


def args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvases", type=int, default=320, help="3/4 of them train")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", type=Path)
    return parser


def overrides(a: argparse.Namespace) -> list[str]:
    return ["recipe=digits_segmentation", "weights.source=none", "seed=0", "sched.name=none",
            f"data.canvases.count={a.canvases}", f"data.canvases.size={a.size}",
            f"data.batch_size={a.batch}", "data.num_workers=0", "trainer.max_epochs=2",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


def plain_loop(a: argparse.Namespace) -> tuple[float, list[float]]:
    """What a person writes by hand around torchvision's segmentation model: the "out" map's
    cross-entropy over labelled pixels, backward, step. Returns (steady images/s, loss per
    step)."""
    cfg, _ = compose_config(overrides(a))
    plan = plan_run(cfg, load=False)  # the same model, initial weights and datasets
    assert not plan.problems, plan.problems
    model, dataset = plan.built.model.train(), plan.data.train_set
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4},
                                   {"params": rest, "weight_decay": 0.0}], lr=2e-3)
    losses: list[float] = []
    seconds = images = 0.0
    for epoch in range(2):
        seed_epoch(cfg.seed, epoch)  # the head's dropout draws what the framework's draws
        order = list(EpochShuffle(len(dataset), cfg.seed, epoch))
        usable = len(order) - (len(order) % a.batch == 1)  # a lone last image is dropped
        start = 0.0
        for b, first in enumerate(range(0, usable, a.batch)):
            items = [dataset[key] for key in order[first:min(first + a.batch, usable)]]
            x = torch.stack([i[0] for i in items])
            y = torch.stack([i[1] for i in items])
            loss = functional.cross_entropy(model(x)["out"], y, ignore_index=IGNORED)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if epoch == 1:
                if b == 0:
                    start = time.perf_counter()
                else:
                    images += len(items)
        if epoch == 1:
            seconds = time.perf_counter() - start
    return images / seconds, losses


def main() -> None:
    a = args_parser().parse_args()
    if a.smoke:
        a.canvases, a.size, a.batch, a.repeats = 16, 32, 4, 1
    plain, framework, curve, waits = [], [], [], []
    for _ in range(a.repeats):
        rate, losses = plain_loop(a)
        plain.append(rate)
        metrics = framework_run(overrides(a))
        framework.append(metrics["train_images_per_second"])
        waits.append(metrics["input_wait_share"])
        theirs = framework_losses(metrics["run_dir"])
        # metrics.csv's step column is the 0-based step the loss was computed at
        curve.append(max(abs(losses[step] - loss) for step, loss in theirs.items()
                         if step < len(losses)))
    report(f"Segmentation overhead: DeepLabv3 on a ResNet-18 (layer2) on {a.size} px canvases, "
           f"batch {a.batch}, CPU",
           ["plain loop img/s", "framework img/s", "ratio", "max loss difference (per step)",
            "framework input wait", "runs"],
           [[f"{median(plain):.1f}", f"{median(framework):.1f}",
             f"{median(framework) / median(plain):.3f}", f"{max(curve):.2e}",
             f"{100 * median(waits):.1f}%", a.repeats]],
           a.out)


if __name__ == "__main__":
    main()
