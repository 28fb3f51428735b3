"""Where a run's compute goes: the FLOPs of one training step per image, counted by torch's
FLOP counter, and the model FLOPs utilisation (MFU) they give with the measured images/s
against the device's peak.

The step is counted as it runs — the network the step calls (the suffix when the feature
cache holds the frozen prefix), forward and backward, gradients only where parameters train —
on meta tensors through `torch.func.functional_call`: nothing is computed, no weight, buffer,
gradient or random stream of the run is touched, and no copy of the model is made.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

# Dense peak TFLOP/s per device, (16-bit tensor cores, float32 without TF32), from the
# vendors' data sheets; matched by the first name that occurs in the device's name. A card
# not listed (or a CPU) has no MFU unless trainer.peak_tflops gives its peak.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
}
SIXTEEN_BIT = ("16-mixed", "bf16-mixed", "16-true", "bf16-true", "16", "bf16")


def step_flops(net: nn.Module, batch: torch.Tensor) -> float | None:
    """FLOPs of one training step (forward, then backward of the summed outputs) per image of
    `batch`, as `net` runs it; None where the counter cannot run it (an operation without a
    meta kernel, a forward that checks where its input lives)."""
    params = {name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
              for name, p in net.named_parameters()}
    buffers = {name: torch.empty_like(b, device="meta") for name, b in net.named_buffers()}
    x = torch.empty_like(batch, device="meta")
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = functional_call(net, {**params, **buffers}, (x,))
            outputs = out if isinstance(out, tuple | list) else [out]
            total = sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor))
            if isinstance(total, torch.Tensor) and total.requires_grad:
                total.backward()
    except Exception:  # a measurement: whatever the counter cannot follow, the run goes on
        return None
    return counter.get_total_flops() / max(1, len(batch))


def peak_of(device: torch.device, precision: Any, override: float | None
            ) -> tuple[float | None, str]:
    """The device's dense peak TFLOP/s at this precision, and where the figure comes from."""
    if override is not None:
        return float(override), "trainer.peak_tflops"
    if device.type != "cuda":
        return None, f"no peak known for {device.type}; set trainer.peak_tflops"
    return peak_by_name(torch.cuda.get_device_name(device), precision)


def peak_by_name(name: str, precision: Any) -> tuple[float | None, str]:
    """PEAK_TFLOPS's figure for a device name (the first key it contains) at a precision."""
    column = 0 if str(precision) in SIXTEEN_BIT else 1
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[column], f"{name}, {'16-bit' if column == 0 else 'float32'} dense"
    return None, f"no peak known for {name}; set trainer.peak_tflops"


def utilisation(flops_per_image: float | None, images_per_second: float | None,
                peak: float | None) -> dict[str, Any]:
    """What metrics.json records: FLOPs per image of a training step, the achieved TFLOP/s of
    one device, and the MFU (null without a peak)."""
    if flops_per_image is None or not images_per_second:
        return {"train_flops_per_image": flops_per_image}
    achieved = flops_per_image * images_per_second / 1e12
    return {"train_flops_per_image": round(flops_per_image),
            "train_tflops_per_device": round(achieved, 4),
            "mfu": round(achieved / peak, 4) if peak else None}
