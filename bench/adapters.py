"""Adapters against full fine-tuning of the same model, on the digits transfer.

The quickstart's transfer: a ResNet-18 trained by finetune on the digits 0-4
(`recipe=digits_source`, trained once here) fine-tuned on the digits 5-9 it never saw, for the
same epochs, batches and seed: every layer trains (full fine-tuning); rank-8 LoRA on the
convolutions of layer3 and layer4 (under 2% of the parameters); rank-8 LoRA and DoRA on every
stage's convolutions with the frozen BatchNorm layers' statistics updating (`freeze.bn=train`:
the new digits shift them). The head trains fully in each.
Per row: the share of parameters that train, val/acc, training seconds and images/s, the
size of what the run must keep (adapter.safetensors against model.safetensors), AdamW's
state (two float32 moments per trained parameter), and the activations one training step
keeps for its backward (the bytes of every tensor autograd saves, counted once each, for a
batch of 64 — the memory an adapter saves besides the optimizer's). Medians over --repeats
seeds.

    python bench/adapters.py              # the figures in BENCHMARKS.md
    python bench/adapters.py --smoke      # tiny, no figures

Prints a Markdown table; --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_run, median, report

from finetune.compose.prepare import compose_config
from finetune.training.plan import plan_run

SHARED = ["recipe=quickstart", "trainer.enable_progress_bar=false", "eval.report=false",
          "checkpoint.keep=none"]
PLANNED = ("adapter", "freeze")  # the overrides that change what a step keeps
LAYER34 = "[layer3.*.conv*,layer4.*.conv*]"
ALL_CONVS = "[layer*.*.conv*]"  # every 3x3 convolution of the four stages
ROWS = {
    "full fine-tuning": [],
    "LoRA r=8, layer3+4 convs": ["adapter.type=lora", f"adapter.modules={LAYER34}",
                                 "optim.lr=3e-3"],
    "LoRA r=8, all convs, BN statistics update": [
        "adapter.type=lora", f"adapter.modules={ALL_CONVS}", "freeze.bn=train",
        "optim.lr=1e-2"],
    "DoRA r=8, all convs, BN statistics update": [
        "adapter.type=dora", f"adapter.modules={ALL_CONVS}", "freeze.bn=train",
        "optim.lr=1e-2"],
}


def saved_megabytes(overrides: list[str], batch: int = 64) -> float:
    """MB of the tensors autograd keeps for the backward of one training step of the run's
    model as planned (frozen parts need none), each storage counted once."""
    cfg, _ = compose_config(["recipe=quickstart", "weights.source=none", *overrides])
    plan = plan_run(cfg, load=False)
    plan.raise_problems()
    model = plan.built.model.train()
    seen: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(batch, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    return sum(seen.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="seeds per row")
    parser.add_argument("--smoke", action="store_true", help="one tiny run per row")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tiny = ["trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1"] if args.smoke else []
    source = framework_run(["recipe=digits_source", "trainer.enable_progress_bar=false",
                            "eval.report=false", *tiny])["run_dir"]
    start = ["weights.source=run", f"weights.path={source}"]
    rows = []
    for label, extra in ROWS.items():
        runs = [framework_run([*SHARED, *start, *extra, *tiny, f"seed={seed}"])
                for seed in range(1 if args.smoke else args.repeats)]
        metrics = runs  # metrics.json of each, with its run_dir
        share = median([m["trainable_params"] / m["total_params"] for m in metrics])
        trained = median([m["trainable_params"] for m in metrics])
        kept = [Path(r["run_dir"]) / ("adapter.safetensors" if extra else "model.safetensors")
                for r in runs]
        accuracy = median([m["val/acc"] for m in metrics])
        rows.append([label, f"{100 * share:.2f}%", f"{accuracy:.4f}",
                     " ".join(f"{m['val/acc']:.4f}" for m in metrics),
                     f"{median([m['train_seconds'] for m in metrics]):.1f}",
                     f"{median([m['train_images_per_second'] for m in metrics]):.0f}",
                     f"{median([p.stat().st_size for p in kept]) / 2**20:.2f}",
                     f"{2 * 4 * trained / 2**20:.1f}",
                     f"{saved_megabytes([o for o in extra if o.startswith(PLANNED)]):.1f}",
                     len(runs)])
    report("Adapters against full fine-tuning: ResNet-18, digits 0-4 -> 5-9, 3 epochs, 32 px",
           ["fine-tuning", "trainable share", "val/acc", "val/acc per seed", "train s",
            "img/s", "MB kept", "AdamW state MB", "saved activations MB (batch 64)", "runs"],
           rows, args.out)


if __name__ == "__main__":
    main()
