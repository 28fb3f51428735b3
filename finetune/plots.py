"""Pictures of a run: learning curves and the validation confusion matrix."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from finetune.artifacts import write_bytes


def save_png(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def plot_curves(series: dict[str, dict[int, float]], path: Path) -> None:
    """curves.png: training and validation loss, validation accuracy, per epoch.

    Args:
        series: metric -> {epoch: value}, as artifacts.epoch_metrics reads it.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train/loss_epoch", "train loss"), ("val/loss", "val loss")):
        if key in series:
            epochs = sorted(series[key])
            ax_loss.plot(epochs, [series[key][e] for e in epochs], marker="o", label=label)
    for key, label in (("val/acc", "val top-1"), ("val/acc_top5", "val top-5")):
        if key in series:
            epochs = sorted(series[key])
            ax_acc.plot(epochs, [series[key][e] for e in epochs], marker="o", label=label)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
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
