"""Whether a finished run learned anything: the warnings its summary, metrics.json, report and a
sweep's leaderboard carry.

A run whose validation accuracy is at chance, that calls every image by one class, or whose
loss exploded or never fell is `complete` (it ran to the end) but is not a model anyone should
sign off; each warning is one sentence that starts with a short label (before the colon) the
leaderboard shows.
"""

from __future__ import annotations

import math
from typing import Any

TRAIN_LOSS = "train/loss_epoch"  # Lightning's per-epoch mean of the training loss
EXPLODED = 2.0  # a val/loss this many times a uniform guess's (ln K) has exploded


def learning_warnings(confusion: list[list[int]] | None, class_names: list[str],
                      val_loss: float | None, series: dict[str, dict[int, float]],
                      counted: str = "images", accuracy: str = "val/acc") -> list[str]:
    """Every sign that the run learned nothing, one sentence each ([] when none).

    Args:
        confusion: the last validation's confusion matrix (rows: true class, columns:
            predicted), or None (no validation, or a task without one).
        class_names: the run's classes.
        val_loss: the final val/loss.
        series: metric -> {epoch: value}, from metrics.csv.
        counted: what the confusion matrix counts (images; pixels for segmentation).
        accuracy: the name of its accuracy (val/acc; val/pixel_acc).
    """
    found: list[str] = []
    k = len(class_names)
    if confusion and k >= 2:
        total = sum(sum(row) for row in confusion)
        predicted = [j for j in range(k) if sum(row[j] for row in confusion) > 0]
        if total >= 2 and len(predicted) == 1:
            found.append(f"one class predicted: every one of the {total} validation {counted} is "
                         f"called {class_names[predicted[0]]!r}")
        if total:
            hits = sum(confusion[i][i] for i in range(k)) / total
            majority = max(sum(row) for row in confusion) / total
            if hits <= majority:
                found.append(f"at chance: {accuracy} {hits:.4f} is no better than always "
                             f"answering the most common class ({majority:.4f})")
    if val_loss is not None and k >= 2 and (not math.isfinite(val_loss)
                                            or val_loss > EXPLODED * math.log(k)):
        found.append(f"loss exploded: val/loss {val_loss:.4g} is far above the "
                     f"{math.log(k):.2f} of a uniform guess over {k} classes (lower optim.lr)")
    losses = series.get(TRAIN_LOSS, {})
    if len(losses) >= 2:
        first, last = min(losses), max(losses)
        if not losses[last] < losses[first]:
            found.append(f"loss not falling: the training loss went from {losses[first]:.4g} "
                         f"(epoch {first}) to {losses[last]:.4g} (epoch {last})")
    return found


def short(warnings: Any) -> str:
    """The labels of a run's warnings (what a leaderboard cell shows): 'one class predicted;
    at chance'."""
    if not isinstance(warnings, list):
        return ""
    return "; ".join(str(w).split(":", 1)[0][:40] for w in warnings if isinstance(w, str))


def speed_line(metrics: dict[str, Any]) -> str:
    """Where the training time went, one line: steady-state images/s (all devices), the batch
    when the finder chose it, uint8 batches when they were, the share spent waiting for input,
    and the MFU (or the achieved TFLOP/s where no peak is known)."""
    rate = metrics.get("train_images_per_second")
    if not isinstance(rate, int | float):
        return ""
    parts = [f"{rate:,.0f} images/s"]
    found = metrics.get("batch_size_finder")
    if isinstance(found, dict) and isinstance(found.get("found"), int):
        parts.append(f"batch {found['found']} (data.batch_size=auto: {found.get('stopped_at')})")
    if metrics.get("uint8_batches") is True:
        parts.append("uint8 batches")
    wait = metrics.get("input_wait_share")
    if isinstance(wait, int | float):
        parts.append(f"input wait {100 * wait:.1f}%")
    mfu, achieved = metrics.get("mfu"), metrics.get("train_tflops_per_device")
    if isinstance(mfu, int | float):
        parts.append(f"MFU {100 * mfu:.1f}% of {metrics.get('peak_tflops'):g} TFLOP/s "
                     f"({metrics.get('peak_source')})")
    elif isinstance(achieved, int | float):
        parts.append(f"{achieved:.3g} TFLOP/s per device (no peak known: "
                     "trainer.peak_tflops gives the MFU)")
    return ", ".join(parts)
