"""The parts of a detection run's report page: its figures per evaluation (mAP, mAP@0.5,
mAP@0.75, mAR@100; of the masks too for instance segmentation), AP per class, the
precision-recall curves, and the worst images with
their true (green) and found (red) boxes drawn — from evaluation.json and eval.json as
finetune/rundir/box_evaluation.py writes them. Every text is escaped (html_parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.rundir.html_parts import esc, img, num, section, table

FIGURES = ("map", "map_50", "map_75", "mar_100")
MASK_FIGURES = tuple(f"mask_{key}" for key in FIGURES)  # an instance segmenter's


def is_box_result(result: dict[str, Any]) -> bool:
    """Whether an evaluation is a detector's (it has mAP, not accuracy)."""
    return "map" in result


def _has_masks(results: dict[str, dict[str, Any]]) -> bool:
    return any("mask_map" in r for r in results.values())


def figures_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per evaluation: images, true boxes, mAP, mAP@0.5, mAP@0.75, mAR@100 (of the
    masks first, when measured)."""
    names = ["mAP", "mAP@0.5", "mAP@0.75", "mAR@100"]
    keys, heads = FIGURES, [f"box {n}" if _has_masks(results) else n for n in names]
    if _has_masks(results):
        keys, heads = (*MASK_FIGURES, *FIGURES), [*(f"mask {n}" for n in names), *heads]
    return table(["evaluated on", "images", "true boxes", *heads],
                 [[label, r.get("images"), r.get("boxes"), *(r.get(k) for k in keys)]
                  for label, r in results.items()], set(range(1, 3 + len(keys))))


def box_sections(results: dict[str, dict[str, Any]]) -> list[str]:
    """AP per class, PR curves and the worst images of each evaluation (label -> result)."""
    parts: dict[str, list[str]] = {"ap-per-class": [], "pr-curve": [], "worst": []}
    for label, result in results.items():
        heading = f"<h3>{esc(label)}: {esc(result.get('images', '?'))} images</h3>"
        masked = "mask_map" in result
        rows = [[r.get("class"), *([r.get("mask_ap")] if masked else []), r.get("ap"),
                 r.get("ap_50"), r.get("recall"), r.get("boxes")]
                for r in result.get("per_class", []) if isinstance(r, dict)]
        parts["ap-per-class"].append(heading + table(
            ["class", *(["mask AP (IoU 0.5:0.95)"] if masked else []), "box AP (IoU 0.5:0.95)"
             if masked else "AP (IoU 0.5:0.95)", "AP@0.5", "recall (100 boxes)", "true boxes"],
            rows, set(range(1, 5 + masked))))
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
        shape = "mask" if match.get("on") == "masks" else "box"
        rule = (f"<p class=\"muted\">{shape}s scoring at least "
                f"{num(match.get('min_score'), 2)}; a found {shape} matches a true one of its "
                f"class at {'mask ' if shape == 'mask' else ''}IoU &ge; "
                f"{num(match.get('iou'), 2)}. Green: true; red: found.</p>")
        parts["worst"].append(heading + rule
                              + (cells or f'<p class="ok">no missed or false {shape}</p>'))
    masked = any(isinstance(r.get("match"), dict) and r["match"].get("on") == "masks"
                 for r in results.values())
    titles = {"ap-per-class": "AP per class", "pr-curve": "Precision-recall curves",
              "worst": f"Worst images (most missed and false {'masks' if masked else 'boxes'})"}
    said = ", ".join(results) or "no evaluation"
    return [section(k, titles[k], "".join(v) or '<p class="muted">(no evaluation)</p>', said)
            for k, v in parts.items()]
