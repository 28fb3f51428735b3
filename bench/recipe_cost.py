"""What a received recipe costs to read, gate and compose, as a ratio to an empty recipe.

An alias bomb (a few hundred bytes of YAML whose anchors repeat each other) once cost
thirteen times an empty recipe before it was refused; aliases may now add at most
safe_files.MAX_ALIAS_VALUES values, so the bombs are refused before anything is built. Plain
recipes written out are shown beside them: OmegaConf builds and checks each value (about a
millisecond each), which no cap on aliases changes.

    python bench/recipe_cost.py        # medians of 5, ratio to an empty recipe
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from finetune.compose.prepare import compose_with_hydra
from finetune.errors import FinetuneError


def bomb(width: int, depth: int) -> str:
    """Anchors under model.kwargs (a free-form mapping the gate lets through)."""
    text = "model:\n  kwargs:\n"
    for i in range(depth):
        items = ["1"] * width if i == 0 else [f"*a{i - 1}"] * width
        text += f"    a{i}: &a{i} [{', '.join(items)}]\n"
    return text


def written_out(values: int) -> str:
    return "data:\n  classes: [" + ", ".join(str(i % 10) for i in range(values)) + "]\n"


def cost(path: Path, repeats: int = 5) -> tuple[float, str]:
    times, outcome = [], "composed"
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            compose_with_hydra([f"recipe={path}"])
        except FinetuneError as err:
            outcome = "refused: " + err.problems[0].split(": ", 1)[1][:60]
        times.append(time.perf_counter() - started)
    return statistics.median(times), outcome


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    cases = {"empty": "seed: 1\n", "bomb 10^3 (186 B)": bomb(10, 3),
             "bomb 10^4 (249 B)": bomb(10, 4), "bomb 3^7": bomb(3, 7),
             "written out, 100 values": written_out(100),
             "written out, 1,000 values (3 KB)": written_out(1000)}
    base = None
    print(f"{'recipe':<34} {'bytes':>6} {'s':>6} {'x empty':>8}  outcome")
    for name, text in cases.items():
        path = folder / "recipe.yaml"
        path.write_text(text)
        cost(path, 1)  # warm: Hydra's and OmegaConf's first use
        seconds, outcome = cost(path)
        base = base or seconds
        print(f"{name:<34} {len(text.encode()):>6} {seconds:>6.3f} {seconds / base:>8.2f}  "
              f"{outcome}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
