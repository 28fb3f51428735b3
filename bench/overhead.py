"""Framework overhead: `python -m finetune` against a hand-written PyTorch loop.

Both train the same model from the same initial weights (a state dict file) on the same data
tensors (the framework's own train split and transform of its fake data), in the same order,
with the same batch size, threads, optimizer (AdamW, constant lr) and precision. Both report
steady-state training images/s the same way: the first epoch (warm-up) and the first batch
of each epoch are left out, validation is never counted. The loss curves are compared step by
step. A third loop, in the style of timm's benchmark.py (one synthetic batch made on the
device and reused: no host input at all), is the ceiling of what the card does with the model
(`--device-loop`). `--batch auto`: the framework finds its batch first (data.batch_size=auto),
and every loop trains at that size.

    python bench/overhead.py --size 32 --batch 32                       # CPU
    python bench/overhead.py --size 64 --batch 32
    python bench/overhead.py --device cuda --model resnet50 --size 224 --batch 64 \\
        --precision bf16-mixed --channels-last --device-loop            # GPU
    python bench/overhead.py --device cuda --model vit_b_16 --size 224 --batch auto \
        --precision bf16-mixed --compile --device-loop
    python bench/overhead.py --smoke                                    # CI: tiny, no figures

Prints a Markdown table (medians of --repeats runs); --out FILE appends it there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import framework_losses, framework_run, median, report

CLASSES = 10


def args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", default="32", help="images per step, or auto")
    parser.add_argument("--batches", type=int, default=30, help="training batches per epoch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile in every loop")
    parser.add_argument("--uint8", default="auto", choices=["auto", "true", "false"],
                        help="the framework's data.uint8_batches")
    parser.add_argument("--device-loop", action="store_true",
                        help="also a loop over one synthetic batch on the device (timm-style)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=10,
                        help="trainer.log_every_n_steps (the default): the loss curves are "
                             "compared at the steps the framework logs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", type=Path)
    return parser


def framework_overrides(a: argparse.Namespace, init: Path, fake_size: int) -> list[str]:
    accelerator = "gpu" if a.device == "cuda" else "cpu"
    return [f"model.name={a.model}", "weights.source=file", f"weights.path={init}",
            "data=fake", f"data.fake_size={fake_size}", f"data.fake_classes={CLASSES}",
            f"data.image_size={a.size}", f"data.batch_size={a.batch}", "data.val_fraction=0.2",
            "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0", "sched.name=none",
            "trainer.max_epochs=2", "trainer.limit_val_batches=1",
            f"trainer.log_every_n_steps={a.log_every}",
            f"trainer.accelerator={accelerator}", "trainer.devices=1",
            f"trainer.precision={a.precision}", f"model.channels_last={a.channels_last}",
            f"model.compile={a.compile}", f"data.uint8_batches={a.uint8}"]


def the_data(a: argparse.Namespace, fake_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The framework's own train split of its fake data, through its own transform."""
    from omegaconf import OmegaConf

    from finetune.compose.schema import DataConfig
    from finetune.data.datamodule import build_datamodule
    from finetune.models.backbones import preprocessing, weights_enum

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig),
                          {"name": "fake", "fake_size": fake_size, "fake_classes": CLASSES,
                           "image_size": a.size, "batch_size": a.batch})
    # weights.source=file: the architecture's usual eval preprocessing, scaled to the size
    data = build_datamodule(cfg, preprocessing(weights_enum(a.model, "DEFAULT"), a.size), 0)
    items = [data.train_set[i] for i in range(len(data.train_set))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def plain_loop(a: argparse.Namespace, init: Path, x_all: torch.Tensor, y_all: torch.Tensor
               ) -> tuple[float, list[float]]:
    """What a person writes by hand. Returns (steady images/s, loss per step)."""
    from finetune.data.datamodule import EpochShuffle

    device = torch.device(a.device)
    model = torchvision.models.get_model(a.model, num_classes=CLASSES)
    model.load_state_dict(torch.load(init, weights_only=True))
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    forward = torch.compile(model) if a.compile else model
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(a.precision)
    scaler = torch.amp.GradScaler(a.device) if a.precision == "16-mixed" else None
    if a.device == "cuda":
        x_all = x_all.pin_memory()
    losses: list[torch.Tensor] = []
    seconds = images = 0
    for epoch in range(2):
        order = torch.tensor([i for i, _ in EpochShuffle(len(y_all), 0, epoch)])
        start = 0.0
        for b, first in enumerate(range(0, len(order), a.batch)):
            index = order[first:first + a.batch]
            x = x_all[index].to(device, non_blocking=True, memory_format=fmt)
            y = y_all[index].to(device, non_blocking=True)
            cast = torch.autocast(a.device, dtype=dtype) if dtype else nullcontext()
            with cast:
                loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.detach())
            if epoch == 1:
                if a.device == "cuda" and (b == 0 or first + a.batch >= len(order)):
                    torch.cuda.synchronize()
                if b == 0:
                    start = time.perf_counter()
                else:
                    images += len(y)
        if epoch == 1:
            seconds = time.perf_counter() - start
    return images / seconds, [float(v) for v in losses]


def device_loop(a: argparse.Namespace, init: Path, steps: int) -> float:
    """timm's benchmark.py way: one random batch made on the device, reused every step; no
    data moves from the host. Images/s over `steps` steps after as many warm-up steps."""
    device = torch.device(a.device)
    model = torchvision.models.get_model(a.model, num_classes=CLASSES)
    model.load_state_dict(torch.load(init, weights_only=True))
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    forward = torch.compile(model) if a.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(a.precision)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (a.batch,), device=device)
    start = 0.0
    for step in range(2 * steps):
        if step == steps:
            if a.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(a.device, dtype=dtype) if dtype else nullcontext():
            loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if a.device == "cuda":
        torch.cuda.synchronize()
    return steps * a.batch / (time.perf_counter() - start)


def main() -> None:
    a = args_parser().parse_args()
    if a.smoke:
        a.size, a.batch, a.batches, a.repeats, a.log_every = 16, "8", 6, 1, 2
        a.device_loop = True
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    init = work / "init.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(a.model, num_classes=CLASSES).state_dict(), init)
    found = None
    if a.batch == "auto":  # the framework finds it, on a set large enough not to cap it
        metrics = framework_run([*framework_overrides(a, init, 8192),
                                 "trainer.max_epochs=1", "trainer.limit_train_batches=2"])
        found = metrics["batch_size_finder"]
        a.batch = found["found"]
    a.batch = int(a.batch)
    fake_size = int(a.batch * a.batches / 0.8) + 1  # 80 % of it is the train split
    x_all, y_all = the_data(a, fake_size)
    plain, framework, curve, waits, mfus, ceiling = [], [], [], [], [], []
    for _ in range(a.repeats):
        rate, losses = plain_loop(a, init, x_all, y_all)
        plain.append(rate)
        metrics = framework_run(framework_overrides(a, init, fake_size))
        framework.append(metrics["train_images_per_second"])
        waits.append(metrics["input_wait_share"])
        mfus.append(metrics.get("mfu"))
        theirs = framework_losses(metrics["run_dir"])
        curve.append(max(abs(losses[step] - loss) for step, loss in theirs.items()))
        if a.device_loop:
            ceiling.append(device_loop(a, init, a.batches))
    fast = "".join(f"+{name}" for name, on in (("channels_last", a.channels_last),
                                                ("compile", a.compile)) if on)
    known = [m for m in mfus if isinstance(m, float)]
    batch = f"auto = {a.batch} ({found['stopped_at']})" if found else str(a.batch)
    report(f"Overhead: {a.model} {a.size}px batch {batch}, {a.device}, {a.precision}{fast}, "
           f"data.uint8_batches={a.uint8}",
           ["plain loop img/s", "framework img/s", "ratio", "max loss difference (per step)",
            "framework input wait", "framework MFU", "device loop img/s (synthetic)",
            "framework / device loop", "runs"],
           [[f"{median(plain):.1f}", f"{median(framework):.1f}",
             f"{median(framework) / median(plain):.3f}", f"{max(curve):.2e}",
             f"{100 * median(waits):.1f}%",
             f"{100 * median(known):.1f}%" if known else "-",
             f"{median(ceiling):.1f}" if ceiling else "-",
             f"{median(framework) / median(ceiling):.3f}" if ceiling else "-", a.repeats]],
           a.out)


if __name__ == "__main__":
    main()
