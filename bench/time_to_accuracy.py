"""Time to accuracy: how long until a fine-tuned model reaches a validation accuracy, with
finetune and with a plain PyTorch loop.

The digits transfer of the quickstart: a ResNet-18 trained on the digits 0-4 (the recipe
digits_source, trained once here), fine-tuned on 5-9 three ways — the head alone, layer4 and
the head, everything. Both sides start from the same weights, see the same images in the
same order (the framework's own split, transform and epoch orders, written as tensors for the
plain loop beforehand, so that it imports neither finetune nor Lightning), with the same optimizer
(AdamW, lr 1e-3, weight decay 1e-4), one-cycle schedule, batch and epochs. Each runs as a
command of its own (`python -m finetune ...`, `python bench/time_to_accuracy.py --plain ...`),
printing a line after each epoch's validation; this script stamps the lines as they arrive.
The target of a row is the lower of the two final val/acc (both reach it; the two schedules
are not the same code, so the finals differ a little); the figure is the wall time from
launch to the first epoch at or above it (interpreter start included on both sides), medians
of --repeats. finetune uses the caches it chooses (the feature cache for a frozen
prefix); the plain loop runs the frozen layers every step, without autograd.

    python bench/time_to_accuracy.py                 # the figures in BENCHMARKS.md
    python bench/time_to_accuracy.py --size 64 --epochs 6
    python bench/time_to_accuracy.py --smoke         # CI: tiny, no figures

Prints a Markdown table; --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, median, report

ROWS = {"head only": "fc", "layer4 + head": "layer4", "everything": None}
EPOCH_LINE = re.compile(r"epoch (\d+) of \d+: .*val/acc ([0-9.]+)")


def stamped(command: list[str], cwd: Path) -> list[tuple[float, float]]:
    """Run `command`; (seconds since launch, val/acc) for each epoch line it prints."""
    started = time.perf_counter()
    found = []
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            match = EPOCH_LINE.search(line)
            if match:
                found.append((time.perf_counter() - started, float(match.group(2))))
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{''.join(lines[-30:])}")
    return found


def reached(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def prepare_plain_data(work: Path, size: int, batch: int, epochs: int) -> Path:
    """The framework's own split, transform (no augmentation: the digits have none) and epoch
    orders, written once as tensors for the plain loop, which then imports nothing of
    finetune (nor Lightning, which finetune's datamodule imports)."""
    import torch
    from safetensors.torch import save_file

    from finetune.compose.prepare import compose_config
    from finetune.data.datamodule import EpochShuffle, build_datamodule
    from finetune.training.plan import preprocessing_for

    cfg, _ = compose_config(["recipe=quickstart", "weights.source=none",
                             f"data.image_size={size}", f"data.batch_size={batch}"])
    data = build_datamodule(cfg.data, preprocessing_for(cfg), cfg.seed, uint8=False)
    train, val = data.train_set, data.val_set
    tensors = {"x_train": torch.stack([train[i][0] for i in range(len(train))]),
               "y_train": torch.tensor([train[i][1] for i in range(len(train))]),
               "x_val": torch.stack([val[i][0] for i in range(len(val))]),
               "y_val": torch.tensor([val[i][1] for i in range(len(val))])}
    for epoch in range(epochs):
        tensors[f"order{epoch}"] = torch.tensor(
            [i for i, _ in EpochShuffle(len(train), cfg.seed, epoch)])
    path = work / f"plain-data-{size}.safetensors"
    save_file(tensors, str(path))
    return path


def plain(a: argparse.Namespace) -> None:
    """The hand-written loop (run as its own command): prints `epoch N of E: val/acc X`. It
    imports torch, torchvision and safetensors only."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from safetensors.torch import load_file

    torch.manual_seed(0)
    data = load_file(a.data)
    model = torchvision.models.resnet18(num_classes=5)
    state = {k: v for k, v in load_file(Path(a.source) / "model.safetensors").items()
             if not k.startswith("fc.")}
    model.load_state_dict(state, strict=False)
    names = [name for name, _ in model.named_children()]
    frozen = [] if a.train_from == "none" else [
        module for name, module in model.named_children()
        if names.index(name) < names.index(a.train_from)]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=1e-4)
    x_train, y_train = data["x_train"], data["y_train"]
    steps = a.epochs * -(-len(y_train) // a.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    for epoch in range(a.epochs):
        model.train()
        for module in frozen:
            module.eval()
        order = data[f"order{epoch}"]
        for first in range(0, len(order), a.batch):
            chosen = order[first:first + a.batch]
            loss = F.cross_entropy(model(x_train[chosen]), y_train[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(data["x_val"]).argmax(1) == data["y_val"]).float().mean())
        print(f"epoch {epoch} of {a.epochs}: val/acc {accuracy:.4g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--train-from", default="none", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.plain:
        plain(a)
        return
    if a.smoke:
        a.size, a.epochs, a.repeats = 16, 1, 1
    work = Path(tempfile.mkdtemp(prefix="bench-tta-"))
    source = work / "source"
    subprocess.run([sys.executable, "-m", "finetune", "recipe=digits_source",
                    f"data.image_size={a.size}", *(["trainer.max_epochs=1"] if a.smoke else []),
                    "eval.report=false", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={source}"], cwd=work, check=True, capture_output=True)
    tensors = prepare_plain_data(work, a.size, a.batch, a.epochs)
    rows = []
    chosen = {"head only": "fc"} if a.smoke else ROWS
    for label, train_from in chosen.items():
        ours, theirs, targets, finals = [], [], [], []
        for r in range(a.repeats):
            hand = stamped([sys.executable, str(REPO / "bench" / "time_to_accuracy.py"),
                            "--plain", f"--source={source}", f"--data={tensors}",
                            f"--epochs={a.epochs}", f"--batch={a.batch}",
                            f"--train-from={train_from or 'none'}"], work)
            framework = stamped([
                sys.executable, "-m", "finetune", "recipe=quickstart", "weights.source=run",
                f"weights.path={source}", f"data.image_size={a.size}",
                f"data.batch_size={a.batch}", f"trainer.max_epochs={a.epochs}",
                *([f"freeze.train_from={train_from}"] if train_from else []),
                "eval.report=false", "checkpoint.keep=none", "trainer.enable_progress_bar=false",
                f"hydra.run.dir={work / f'{label}-{r}'}".replace(" ", "_")], work)
            target = min(hand[-1][1], framework[-1][1])
            targets.append(target)
            finals.append((hand[-1][1], framework[-1][1]))
            theirs.append(reached(hand, target))
            ours.append(reached(framework, target))
        mine = [t for t in ours if t is not None]  # (always: the target is reached)
        rows.append([label, f"{median([h for h, _ in finals]):.4f}",
                     f"{median([f for _, f in finals]):.4f}", f"{median(targets):.4f}",
                     f"{median(theirs):.1f}",
                     f"{median(mine):.1f}" if len(mine) == len(ours) else "not reached",
                     f"**{median(mine) / median(theirs):.2f}**" if len(mine) == len(ours)
                     else "-"])
    report(f"Time to accuracy: the digits transfer, {a.size} px, {a.epochs} epochs, batch "
           f"{a.batch} (python bench/time_to_accuracy.py)",
           ["fine-tuning", "plain loop final val/acc", "finetune final val/acc",
            "target (the lower)", "plain loop s",
            "finetune s", "ratio"], rows, a.out)


if __name__ == "__main__":
    main()
