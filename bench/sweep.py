"""A split sweep against the same runs started one by one.

The quickstart (a ResNet-18 pretrained on the digits 0-4, fine-tuned on 5-9 at 32 px) from
four split points, freeze.train_from in layer2, layer3, layer4, fc: once as one sweep
(`python -m finetune -m ... freeze.train_from=layer2,layer3,layer4,fc`: one process, the
frozen layers' features computed once for all four jobs and kept in the sweep dir), once as
four separate commands (`python -m finetune ... freeze.train_from=X`, each with its own
in-memory feature cache, as a user would start them). Wall time of the whole (the commands
as a shell runs them), and each split point's val/acc both ways (the same features, the same
seed: it must be the same).

    python bench/sweep.py                 # the figures in BENCHMARKS.md
    python bench/sweep.py --size 64       # larger images: more frozen work to share
    python bench/sweep.py --smoke         # tiny, no figures

Prints a Markdown table (medians of --repeats); --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, median, report

SPLITS = ["layer2", "layer3", "layer4", "fc"]


def command(args: list[str], cwd: Path) -> float:
    """Run `python -m finetune ARGS` in cwd; its wall time."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "finetune", *args,
                             "trainer.enable_progress_bar=false"], cwd=cwd,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"finetune failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["val/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    base = ["recipe=quickstart", f"data.image_size={args.size}",
            f"trainer.max_epochs={args.epochs}", "eval.report=false"]
    splits = SPLITS
    if args.smoke:
        base = ["recipe=base", "data=fake", "data.fake_size=40", "data.fake_classes=4",
                "trainer.max_epochs=1", "eval.report=false"]
        splits, args.repeats = ["layer4", "fc"], 1
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    command([*base, "freeze.train_from=fc", "hydra.run.dir=warm"], work)  # digits_source
    sweeps, singles = [], []
    sweep_acc, single_acc = {}, {}
    for r in range(args.repeats):  # alternated, so both see the machine's same moods
        sweep_dir = work / f"sweep{r}"
        sweeps.append(command(["-m", *base, f"freeze.train_from={','.join(splits)}",
                               f"hydra.sweep.dir={sweep_dir}"], work))
        for i, split in enumerate(splits):
            sweep_acc.setdefault(split, []).append(accuracy(sweep_dir / str(i)))
        total = 0.0
        for split in splits:
            run_dir = work / f"single{r}-{split}"
            total += command([*base, f"freeze.train_from={split}", f"hydra.run.dir={run_dir}"],
                             work)
            single_acc.setdefault(split, []).append(accuracy(run_dir))
        singles.append(total)
        print(f"repeat {r}: sweep {sweeps[-1]:.1f} s, {len(splits)} runs {total:.1f} s",
              flush=True)
    same = all(sweep_acc[s] == single_acc[s] for s in splits)
    rows = [[f"`python -m finetune -m {' '.join(base)} freeze.train_from={','.join(splits)}`",
             f"{median(sweeps):.1f}", f"{median(singles):.1f}",
             f"**{median(sweeps) / median(singles):.2f}**",
             " / ".join(f"{s} {median(sweep_acc[s]):.4f}" for s in splits),
             "yes" if same else "NO"]]
    if not args.smoke:
        report(f"A {len(splits)}-point split sweep against {len(splits)} separate runs "
               f"({args.size} px, {args.epochs} epochs, {args.repeats} repeats)",
               ["sweep", "sweep s", "separate runs s", "ratio", "val/acc per split point",
                "same val/acc"], rows, args.out)
    print(f"work dir: {work} (repo {REPO})")


if __name__ == "__main__":
    main()
