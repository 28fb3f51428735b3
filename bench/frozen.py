"""The frozen prefix: training layer4 + head against full fine-tuning, per step.

The model is frozen by the framework's own plan (`freeze.train_from`); the steps are plain
forward / backward / AdamW steps over random images, so the figure is the freeze alone.
Memory: on GPU the peak allocated; on CPU the activation bytes autograd keeps for backward
in one step (parameters, which it also keeps, not counted).

    python bench/frozen.py --size 64 --batch 32            # CPU
    python bench/frozen.py --device cuda --size 224 --batch 64
    python bench/frozen.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, report


def one_setting(model_name: str, train_from: str | None, size: int, batch: int, steps: int,
                device: str) -> tuple[float, float]:
    """(seconds per step, memory in MB) with everything before `train_from` frozen."""
    from finetune.training.freezing import apply_freeze, plan_freeze

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, num_classes=10).to(device).train()
    apply_freeze(model, plan_freeze(model, train_from))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    weights = {p.data_ptr() for p in model.parameters()}
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    def step(count: bool = False) -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        if count:
            hooks.__enter__()
        loss = F.cross_entropy(model(x), y)
        if count:
            hooks.__exit__(None, None, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(count=True)
    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    memory = (torch.cuda.max_memory_allocated() if device == "cuda" else sum(saved)) / 2**20
    return seconds, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    if a.smoke:
        a.size, a.batch, a.steps, a.repeats = 32, 4, 1, 1
    results = {}
    for train_from in (None, "layer4"):
        runs = [one_setting(a.model, train_from, a.size, a.batch, a.steps, a.device)
                for _ in range(a.repeats)]
        results[train_from] = (median([s for s, _ in runs]), runs[0][1])
    (full_s, full_m), (part_s, part_m) = results[None], results["layer4"]
    what = "peak GPU memory MB" if a.device == "cuda" else "activation MB kept for backward"
    report(f"Frozen prefix: {a.model} {a.size}px batch {a.batch}, {a.device}",
           ["trains", "ms / step", "speedup", what],
           [["everything", f"{1000 * full_s:.1f}", "1.00", f"{full_m:.1f}"],
            ["layer4 + head", f"{1000 * part_s:.1f}", f"{full_s / part_s:.2f}",
             f"{part_m:.1f}"]], a.out)


if __name__ == "__main__":
    main()
