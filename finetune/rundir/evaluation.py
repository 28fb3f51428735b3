"""How good a model is on labelled images: per class, calibrated, and where it is wrong.

One evaluation serves the test split after a run (`test_eval.json`), `python -m
finetune.evaluate` on any labelled data (`eval.json`) and the run report: the model's
logits on every image, under torch.inference_mode(), then torchmetrics' metrics on them —
accuracy, top-5, precision / recall / F1 / support per class with macro and weighted
averages, the confusion matrix (counts and row-normalized), the expected calibration error
(15 equal-width confidence bins) and the reliability table behind its diagram — and the most
confidently wrong images, as small inline thumbnails. A temperature (`fit_temperature`:
the one scalar T > 0 minimizing the validation NLL of logits / T) changes the
probabilities, never the predicted class.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from finetune.data.images import ImageProblem, open_rgb

BINS = 15  # calibration bins (the usual ECE-15)
WRONG_SHOWN = 8  # the most confidently wrong images a report shows


@dataclass
class Outputs:
    """A model's logits on a set of images, their labels, and each image's name."""

    logits: torch.Tensor  # (N, K) float32, on the CPU
    labels: torch.Tensor  # (N,) int64
    items: list[str]  # file path, or #index for in-memory data


def collect(model: nn.Module, dataset: Dataset, batch_size: int = 64,
            items: list[str] | None = None, label_map: list[int] | None = None) -> Outputs:
    """The model's logits on every image of `dataset` (its own eval transform), in order.

    Args:
        label_map: the model's class index of each of the dataset's labels (evaluating on
            data whose classes are a subset of the model's, matched by name).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            out = model(x.to(device))
            out = out[0] if isinstance(out, tuple | list) else out
            logits.append(out.float().cpu())
            labels.append(torch.as_tensor(y))
    model.train(was_training)
    joined = torch.cat(logits) if logits else torch.zeros(0, 0)
    target = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long)
    if label_map is not None:
        target = torch.as_tensor(label_map, dtype=torch.long)[target]
    names = items if items is not None else [f"#{i}" for i in range(len(target))]
    return Outputs(joined, target, names)


def item_names(dataset: Dataset) -> list[str]:
    """Each image's name: its file path, or #index for in-memory images."""
    paths = getattr(dataset, "paths", None)
    return [str(p) for p in paths] if paths is not None else [
        f"#{i}" for i in range(len(dataset))]  # type: ignore[arg-type]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimizing the cross-entropy of logits / T (Guo et al. 2017):
    LBFGS on log T, from T = 1, in float64."""
    z, y = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t.detach().exp())
    return round(value, 6) if math.isfinite(value) and value > 0 else 1.0


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values]


def metrics(outputs: Outputs, class_names: list[str], temperature: float = 1.0,
            bins: int = BINS) -> dict[str, Any]:
    """Every figure of an evaluation, from torchmetrics (the reliability table's bins as
    MulticlassCalibrationError bins them)."""
    k = len(class_names)
    logits, labels = outputs.logits / temperature, outputs.labels
    probs = torch.softmax(logits, dim=1)
    predicted = probs.argmax(dim=1)
    n = len(labels)
    per_class = {
        "precision": MulticlassPrecision(k, average=None, zero_division=0)(probs, labels),
        "recall": MulticlassRecall(k, average=None, zero_division=0)(probs, labels),
        "f1": MulticlassF1Score(k, average=None, zero_division=0)(probs, labels),
    }
    support = torch.bincount(labels, minlength=k)
    averaged = {f"{avg}/{name}": round(float(cls(k, average=avg, zero_division=0)(probs, labels)),
                                       6)
                for avg in ("macro", "weighted")
                for name, cls in (("precision", MulticlassPrecision),
                                  ("recall", MulticlassRecall), ("f1", MulticlassF1Score))}
    confusion = MulticlassConfusionMatrix(k)(probs, labels)
    normalized = MulticlassConfusionMatrix(k, normalize="true")(probs, labels)
    ece = float(MulticlassCalibrationError(k, n_bins=bins, norm="l1")(probs, labels))
    confidence = probs.max(dim=1).values
    result: dict[str, Any] = {
        "images": n,
        "acc": round(float(MulticlassAccuracy(k, average="micro")(probs, labels)), 6),
        **({"acc_top5": round(float(MulticlassAccuracy(k, top_k=5, average="micro")(
            probs, labels)), 6)} if k > 5 else {}),
        "loss": round(float(nn.functional.cross_entropy(logits, labels)), 6) if n else None,
        **averaged,
        "ece": round(ece, 6),
        "temperature": temperature,
        "per_class": [{"class": name, "precision": p, "recall": r, "f1": f,
                       "support": int(s)} for name, p, r, f, s in zip(
            class_names, _rounded(per_class["precision"]), _rounded(per_class["recall"]),
            _rounded(per_class["f1"]), support.tolist(), strict=True)],
        "confusion": {"classes": class_names, "counts": confusion.tolist(),
                      "normalized": [_rounded(row) for row in normalized]},
        "reliability": reliability(confidence, predicted == labels, bins),
    }
    return result


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS
                ) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: its range, image count, mean confidence and accuracy
    (empty bins: count 0). Bins as torchmetrics' calibration error cuts them."""
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    # [low, high) as torchmetrics bins them (a confidence of exactly 1 in the last bin)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(max=bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        rows.append({"low": round(float(edges[b]), 6), "high": round(float(edges[b + 1]), 6),
                     "count": count,
                     "confidence": round(float(confidence[inside].mean()), 6) if count else None,
                     "accuracy": round(float(correct[inside].float().mean()), 6)
                     if count else None})
    return rows


def predictions_rows(outputs: Outputs, class_names: list[str], temperature: float = 1.0
                     ) -> list[list[Any]]:
    """One row per image: item, true class, predicted class, its probability, and the
    probability of the true class."""
    probs = torch.softmax(outputs.logits / temperature, dim=1)
    top = probs.max(dim=1)
    return [[item, class_names[int(y)], class_names[int(p)], round(float(c), 6),
             round(float(probs[i, int(y)]), 6)]
            for i, (item, y, p, c) in enumerate(zip(outputs.items, outputs.labels,
                                                    top.indices, top.values, strict=True))]


PREDICTION_HEADER = ["item", "label", "predicted", "confidence", "label_probability"]


def confidently_wrong(outputs: Outputs, class_names: list[str], dataset: Any,
                      temperature: float = 1.0, shown: int = WRONG_SHOWN,
                      size: int = 64) -> list[dict[str, Any]]:
    """The wrong predictions made with the highest confidence, each with a PNG thumbnail
    (a data: URI, so a report that shows it needs no other file)."""
    probs = torch.softmax(outputs.logits / temperature, dim=1)
    top = probs.max(dim=1)
    wrong = (top.indices != outputs.labels).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: -float(top.values[i]))
    return [{"item": outputs.items[i], "label": class_names[int(outputs.labels[i])],
             "predicted": class_names[int(top.indices[i])],
             "confidence": round(float(top.values[i]), 6),
             "thumbnail": thumbnail(dataset, i, size)} for i in wrong[:shown]]


def thumbnail(dataset: Any, index: int, size: int = 64) -> str | None:
    """A PNG data URI of image `index` of the dataset as it was read (before normalizing),
    at most `size` px; None when it cannot be read now, or when the file lies outside the
    data's own folder (data.follow_links=true reads such files; the page sent to colleagues
    never shows them)."""
    try:
        if hasattr(dataset, "paths"):
            root = getattr(dataset, "root", None)
            path = Path(dataset.paths[index]).resolve()
            if root is None or not path.is_relative_to(Path(root).resolve()):
                return None
            image = open_rgb(path, getattr(dataset, "max_pixels", None) or 89_478_485)
        else:
            array = dataset.images[index].permute(1, 2, 0).contiguous().numpy()
            image = Image.fromarray(array)
    except (ImageProblem, OSError, IndexError, AttributeError):
        return None
    image = image.copy()
    image.thumbnail((size, size))
    if min(image.size) < size // 2:  # tiny images (8x8 digits): enlarge, pixels kept sharp
        scale = max(1, size // max(image.size))
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def evaluate(model: nn.Module, dataset: Any, class_names: list[str], temperature: float = 1.0,
             batch_size: int = 64, label_map: list[int] | None = None,
             bins: int = BINS) -> tuple[dict[str, Any], Outputs]:
    """(every figure and the confidently wrong images, the outputs) of `model` on `dataset`."""
    outputs = collect(model, dataset, batch_size, item_names(dataset), label_map)
    result = metrics(outputs, class_names, temperature, bins)
    result["confidently_wrong"] = confidently_wrong(outputs, class_names, dataset, temperature)
    return result, outputs


def flat(result: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The scalar figures of an evaluation under `prefix/` (for metrics.json)."""
    keys = ("acc", "acc_top5", "loss", "macro/f1", "weighted/f1", "ece", "images")
    return {f"{prefix}/{k}": result[k] for k in keys if k in result}
