"""Pictures of a run: learning curves, the validation confusion matrix, reliability, and a
detector's precision-recall curves."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from finetune.rundir.artifacts import write_bytes


def save_png(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


SCORES = (("val/acc", "val top-1"), ("val/acc_top5", "val top-5"),
          ("val/map", "val mAP"), ("val/map_50", "val mAP@0.5"))


def plot_curves(series: dict[str, dict[int, float]], path: Path) -> None:
    """curves.png: training and validation loss, and the validation scores the run has
    (accuracy; or a detector's mAP), per epoch.

    Args:
        series: metric -> {epoch: value}, as artifacts.epoch_metrics reads it.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train/loss_epoch", "train loss"), ("val/loss", "val loss")):
        if key in series:
            epochs = sorted(series[key])
            ax_loss.plot(epochs, [series[key][e] for e in epochs], marker="o", label=label)
    for key, label in SCORES:
        if key in series:
            epochs = sorted(series[key])
            ax_acc.plot(epochs, [series[key][e] for e in epochs], marker="o", label=label)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="mAP" if "val/map" in series else "accuracy", xlabel="epoch",
               ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    save_png(fig, path)


def plot_confusion(matrix: list[list[int]], class_names: list[str], path: Path) -> None:
    """confusion_matrix.png: rows are true classes, columns predictions, counts in cells."""
    n = len(class_names)
    side = max(4.0, min(16.0, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true",
           title="validation confusion matrix")
    ax.set_xticklabels(class_names, rotation=90 if n > 10 else 0)
    ax.set_yticklabels(class_names)
    if n <= 30:
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if count > peak / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=color,
                        fontsize=max(6, 12 - int(math.log2(n + 1))))
    save_png(fig, path)


def plot_reliability(bins: list[dict], path: Path, title: str = "") -> None:
    """reliability.png: accuracy against confidence per bin (the diagonal is perfect
    calibration), the bars' gap to it is what the ECE averages; image counts below."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    shown = [b for b in bins if b.get("count")]
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    width = (bins[0]["high"] - bins[0]["low"]) if bins else 0.1
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    ax.bar([(b["low"] + b["high"]) / 2 for b in shown], [b["accuracy"] for b in shown],
           width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.scatter([b["confidence"] for b in shown], [b["accuracy"] for b in shown], s=10,
               color="black", zorder=3, label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy",
           title=f"reliability{f': {title}' if title else ''}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_n.bar(centers, [b.get("count") or 0 for b in bins], width=width * 0.95, color="gray")
    ax_n.set(xlabel="confidence", ylabel="images")
    save_png(fig, path)


def plot_pr_curve(curve: dict, path: Path, title: str = "") -> None:
    """A detector's precision against recall per class at one IoU (box_evaluation's
    `pr_curve`: COCO's 101 recall points; -1 where a recall was never reached)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    recall = curve.get("recall") or []
    for name, precision in (curve.get("precision") or {}).items():
        points = [(r, p) for r, p in zip(recall, precision, strict=False) if p is not None
                  and p >= 0]
        if points:
            ax.plot(*zip(*points, strict=True), label=str(name)[:24])
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"precision-recall at IoU {curve.get('iou', 0.5)}"
                 f"{f': {title}' if title else ''}")
    ax.grid(alpha=0.3)
    if ax.lines and len(ax.lines) <= 20:
        ax.legend(fontsize=8, loc="lower left")
    save_png(fig, path)


def plot_lr_find(lrs: list[float], losses: list[float], suggested: float, path: Path) -> None:
    """The learning-rate finder's curve: the smoothed training loss against the learning rate
    (log scale), the suggested rate marked."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = [(lr, loss) for lr, loss in zip(lrs, losses, strict=False)
              if math.isfinite(loss)]
    if points:
        ax.plot(*zip(*points, strict=True), color="#1f77b4")
    ax.axvline(suggested, color="#d62728", linestyle="--", label=f"suggested {suggested:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)",
           title="learning-rate finder (optim.lr=auto)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
