"""The parts of a segmentation run's report page: its figures per evaluation (mIoU, pixel
accuracy, Dice), the IoU of each class, the confusion matrix over the validation pixels, and
the worst images beside their true and predicted masks — from metrics.json, evaluation.json
and eval.json as finetune/rundir/mask_evaluation.py writes them. Every text is escaped
(html_parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.rundir import artifacts
from finetune.rundir.html_parts import esc, img, num, png_uri, section, table


def is_mask_result(result: Any) -> bool:
    """Whether an evaluation is a segmentation model's (it has mIoU)."""
    return isinstance(result, dict) and "miou" in result


def mask_figures(results: dict[str, dict[str, Any]]) -> str:
    """One row per evaluation: images, labelled pixels, mIoU, pixel accuracy, Dice."""
    return table(["evaluated on", "images", "labelled pixels", "mIoU", "pixel accuracy",
                  "Dice"],
                 [[label, r.get("images"), r.get("pixels"), r.get("miou"), r.get("pixel_acc"),
                   r.get("dice")] for label, r in results.items()], {1, 2, 3, 4, 5})


def mask_sections(results: dict[str, dict[str, Any]], metrics: dict[str, Any],
                  run_dir: Path) -> list[str]:
    """IoU per class (each evaluation's, else the last validation's), the pixel confusion
    matrix, and the worst images of each evaluation."""
    per_class, worst = [], []
    for label, result in results.items():
        heading = f"<h3>{esc(label)}: {esc(result.get('images', '?'))} images</h3>"
        rows = [[r.get("class"), r.get("iou") if r.get("iou") is not None else "— (absent)",
                 r.get("pixels")] for r in result.get("per_class", []) if isinstance(r, dict)]
        per_class.append(heading + table(["class", "IoU", "true pixels"], rows, {1, 2}))
        cells = "".join(
            f'<div class="worst">{img(w.get("thumbnail"), str(w.get("item")), "thumb")}'
            f'<b class="bad">mIoU {num(w.get("miou"))}</b>, pixel accuracy '
            f'{num(w.get("pixel_acc"))}<br><span class="muted">'
            f'{esc(Path(str(w.get("item"))).name)}</span></div>'
            for w in result.get("worst", []) if isinstance(w, dict))
        worst.append(heading + '<p class="muted">image, true mask, predicted mask (white: '
                     "unlabelled)</p>" + (cells or '<p class="muted">(no image)</p>'))
    iou = metrics.get("val/iou_per_class")
    if not per_class and isinstance(iou, dict):  # a run without eval.report
        per_class.append(table(["class", "IoU (last validation)"],
                               [[n, v if isinstance(v, int | float) else "— (absent)"]
                                for n, v in iou.items()], {1}))
    said = ", ".join(results) or "the last validation"
    return [section("iou-per-class", "IoU per class", "".join(per_class), said),
            section("confusion", "Confusion matrix (validation pixels)",
                    img(png_uri(run_dir / artifacts.CONFUSION), "confusion matrix over pixels"),
                    "rows: true class, columns: predicted"),
            section("worst", "Worst images (lowest mIoU)",
                    "".join(worst) or '<p class="muted">(no evaluation)</p>', said)]
