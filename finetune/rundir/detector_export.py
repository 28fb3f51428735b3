"""Exporting a detection run's detector (finetune/rundir/exporting.py decides where the files
go and writes them; this module makes and checks them).

TorchScript: the detector scripted whole (`torch.jit.script`, as torchvision's detectors
are written for it): a list of float images (3, H, W) in [0, 1] of any sizes in, and — as
scripted R-CNNs always do — a (losses, detections) pair out, detections a list of
{boxes, labels, scores} per image. ONNX: torchvision's TorchScript-based exporter (the path
its own ONNX tests take for detectors): one image (3, H, W) of any height and width in; boxes
(N, 4), labels (N,) and scores (N,) out.

Parity: the export and the eager detector find boxes on images of other sizes than the
one exported with, one image at a time (a batch pads its images to a common size, which
moves boxes near the edges); the same number of boxes, the same labels, and boxes and
scores within a tolerance (each box paired with the nearest of its class: boxes of equal
score may come in another order), or nothing is written. A Mask R-CNN's masks (N, 1, H, W)
come out too (ONNX: a fourth output, `masks`), and each paired object's mask — its pixels
above one half — must agree with the eager model's on all but MASK_TOLERANCE of its pixels.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.tasks.instances import MASK_THRESHOLD

BOX_TOLERANCE = 1e-2  # pixels
SCORE_TOLERANCE = 1e-4
MASK_TOLERANCE = 1e-3  # the share of a mask's pixels that may differ
OPSET = 17
Found = dict[str, torch.Tensor]


def examples(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """Two images of different sizes near the run's input size, of a fixed seed: random
    pixels under a smooth field, so that a trained detector finds boxes in them."""
    size = int(model.preprocessing.crop)
    generator = torch.Generator().manual_seed(seed)
    shapes = [(size, size), (max(8, size * 3 // 4), max(8, size * 5 // 4))]
    return [torch.rand(3, h, w, generator=generator) for h, w in shapes]


def torchscript(model: nn.Module, path: Path) -> Callable[[list[torch.Tensor]], list[Found]]:
    """Script, save, and return a runner of the saved file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RCNN always returns a (Losses, Detections) tuple"
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path))

    def run(images: list[torch.Tensor]) -> list[Found]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = loaded(images)
        return out[1] if isinstance(out, tuple) else out

    return run


def has_mask_branch(model: nn.Module) -> bool:
    """Whether the detector is a Mask R-CNN with its mask branch (torchvision's RoIHeads
    says)."""
    heads = getattr(model, "roi_heads", None)
    return heads is not None and heads.has_mask()


def onnx(model: nn.Module, path: Path) -> Callable[[list[torch.Tensor]], list[Found]] | None:
    """Export one image's graph; a runner through onnxruntime, or None without it."""
    if importlib.util.find_spec("onnx") is None:
        raise FinetuneError("format=onnx needs the onnx package: pip install 'finetune[onnx]'")
    outputs = ["boxes", "labels", "scores", *(["masks"] if has_mask_branch(model) else [])]
    axes = {"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0], "masks": [0, 2, 3]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (examples(model, 0)[:1],), str(path), opset_version=OPSET,
                          dynamo=False, input_names=["image"], output_names=outputs,
                          dynamic_axes={k: v for k, v in axes.items()
                                        if k == "image" or k in outputs})
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    # lazy: an optional extra (finetune[onnx])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: list[torch.Tensor]) -> list[Found]:
        found = []
        for image in images:
            values = session.run(None, {"image": image.numpy()})
            found.append({k: torch.from_numpy(v) for k, v in zip(outputs, values, strict=True)})
        return found

    return run


def parity(model: nn.Module, runner: Callable[[list[torch.Tensor]], list[Found]],
           fmt: str) -> dict[str, Any]:
    """The export against the eager detector on `examples` (seed 1): the largest box and
    score differences and the boxes compared; FinetuneError when they differ."""
    images = examples(model, 1)
    with torch.inference_mode():  # one image at a time: a batch pads its images alike
        expected = [model([image])[0] for image in images]
        got = [runner([image])[0] for image in images]
    box_diff = score_diff = mask_diff = 0.0
    compared = 0
    for want, have in zip(expected, got, strict=True):
        if len(want["boxes"]) != len(have["boxes"]) or not torch.equal(
                want["labels"].long().sort().values, have["labels"].long().sort().values):
            raise FinetuneError(f"parity check failed: the {fmt} export found "
                                f"{len(have['boxes'])} boxes where the model found "
                                f"{len(want['boxes'])} (or other classes); nothing was written")
        boxes, scores, masks = paired(want, have)
        box_diff, score_diff = max(box_diff, boxes), max(score_diff, scores)
        mask_diff = max(mask_diff, masks)
        compared += len(want["boxes"])
    if box_diff > BOX_TOLERANCE or score_diff > SCORE_TOLERANCE or mask_diff > MASK_TOLERANCE:
        raise FinetuneError(f"parity check failed: boxes differ by up to {box_diff:.3g} px "
                            f"(tolerance {BOX_TOLERANCE}), scores by {score_diff:.3g} "
                            f"(tolerance {SCORE_TOLERANCE}) and masks in up to {mask_diff:.3g} "
                            f"of their pixels (tolerance {MASK_TOLERANCE}) between the {fmt} "
                            "export and the model; nothing was written")
    masked = {"parity_max_mask_diff": mask_diff} if has_mask_branch(model) else {}
    return {"parity_boxes_compared": compared, "parity_max_box_diff": box_diff,
            "parity_max_score_diff": score_diff, **masked,
            "tolerance": {"boxes": BOX_TOLERANCE, "scores": SCORE_TOLERANCE,
                          **({"masks": MASK_TOLERANCE} if masked else {})}}


def paired(want: Found, have: Found) -> tuple[float, float, float]:
    """The largest box and score differences, and the largest share of a mask's pixels
    that differ (0 without masks), between two sets of objects, each paired with the
    nearest unpaired box of its class: boxes of equal score may come in either order."""
    free = list(range(len(have["boxes"])))
    box_diff = score_diff = mask_diff = 0.0
    for i in range(len(want["boxes"])):
        same = [j for j in free if int(have["labels"][j]) == int(want["labels"][i])]
        if not same:
            return float("inf"), float("inf"), float("inf")
        gaps = [float((have["boxes"][j] - want["boxes"][i]).abs().max()) for j in same]
        j = same[min(range(len(same)), key=gaps.__getitem__)]
        free.remove(j)
        box_diff = max(box_diff, min(gaps))
        score_diff = max(score_diff, float((have["scores"][j] - want["scores"][i]).abs()))
        if "masks" in want:
            if "masks" not in have or have["masks"][j].shape != want["masks"][i].shape:
                return box_diff, score_diff, float("inf")
            differ = (have["masks"][j] > MASK_THRESHOLD) != (want["masks"][i] > MASK_THRESHOLD)
            mask_diff = max(mask_diff, float(differ.float().mean()))
    return box_diff, score_diff, mask_diff


def io_description(fmt: str, masks: bool = False) -> dict[str, Any]:
    """What the export takes and gives (the info file beside it); `masks`: a Mask R-CNN's."""
    found = ("boxes (N, 4): x1, y1, x2, y2 in the input image's pixels; labels (N,): the "
             "index in class_names + 1 (0 is the background, never returned); scores (N,)"
             + ("; masks (N, 1, H, W): each object's probability per pixel of the input "
                "image (its mask: above 0.5)" if masks else ""))
    if fmt == "torchscript":
        return {"input": "a list of float images (3, H, W) in [0, 1], any sizes (the model "
                         "resizes and normalizes them itself)",
                "output": f"(losses, detections): detections a list per image of {found}"}
    return {"input": "image: one float image (3, H, W) in [0, 1], any height and width",
            "output": found}
