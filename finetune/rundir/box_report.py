"""The parts of a detection run's report page: its figures per evaluation (mAP, mAP@0.5,
mAP@0.75, mAR@100), AP per class, the precision-recall curves, and the worst images with
their true (green) and found (red) boxes drawn — from evaluation.json and eval.json as
finetune/rundir/box_evaluation.py writes them. Every text is escaped (html_parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.rundir.html_parts import esc, img, num, section, table

FIGURES = ("map", "map_50", "map_75", "mar_100")


def is_box_result(result: dict[str, Any]) -> bool:
    """Whether an evaluation is a detector's (it has mAP, not accuracy)."""
    return "map" in result


def figures_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per evaluation: images, true boxes, mAP, mAP@0.5, mAP@0.75, mAR@100."""
    return table(["evaluated on", "images", "true boxes", "mAP", "mAP@0.5", "mAP@0.75",
                  "mAR@100"],
                 [[label, r.get("images"), r.get("boxes"), *(r.get(k) for k in FIGURES)]
                  for label, r in results.items()], {1, 2, 3, 4, 5, 6})


def box_sections(results: dict[str, dict[str, Any]]) -> list[str]:
    """AP per class, PR curves and the worst images of each evaluation (label -> result)."""
    parts: dict[str, list[str]] = {"ap-per-class": [], "pr-curve": [], "worst": []}
    for label, result in results.items():
        heading = f"<h3>{esc(label)}: {esc(result.get('images', '?'))} images</h3>"
        rows = [[r.get("class"), r.get("ap"), r.get("ap_50"), r.get("recall"), r.get("boxes")]
                for r in result.get("per_class", []) if isinstance(r, dict)]
        parts["ap-per-class"].append(heading + table(
            ["class", "AP (IoU 0.5:0.95)", "AP@0.5", "recall (100 boxes)", "true boxes"], rows,
            {1, 2, 3, 4}))
        parts["pr-curve"].append(heading + img(result.get("pr_curve_png"),
                                               f"precision-recall curves, {label}"))
        match = result.get("match") if isinstance(result.get("match"), dict) else {}
        worst = [w for w in result.get("worst", []) if isinstance(w, dict)]
        cells = "".join(
            f'<div class="worst">{img(w.get("thumbnail"), str(w.get("item")), "thumb")}'
            f'<b class="bad">{esc(w.get("missed"))} missed, {esc(w.get("false"))} false</b>'
            f"<br>{esc(w.get('true_boxes'))} true, {esc(w.get('found_boxes'))} found<br>"
            f'<span class="muted">{esc(Path(str(w.get("item"))).name)}</span></div>'
            for w in worst)
        rule = (f"<p class=\"muted\">boxes scoring at least {num(match.get('min_score'), 2)}; "
                f"a found box matches a true one of its class at IoU &ge; "
                f"{num(match.get('iou'), 2)}. Green: true; red: found.</p>")
        parts["worst"].append(heading + rule
                              + (cells or '<p class="ok">no missed or false box</p>'))
    titles = {"ap-per-class": "AP per class", "pr-curve": "Precision-recall curves",
              "worst": "Worst images (most missed and false boxes)"}
    said = ", ".join(results) or "no evaluation"
    return [section(k, titles[k], "".join(v) or '<p class="muted">(no evaluation)</p>', said)
            for k, v in parts.items()]
