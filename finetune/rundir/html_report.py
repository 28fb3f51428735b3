"""report.html: one self-contained page per run dir (and per sweep dir) that a person opens.

A run's page: first its verdict, on one screen — what was trained on what data, each
evaluation once (val, test, `finetune evaluate`'s), whether it can be used (the test figure,
or that it is validated only, or what it failed to learn), whether a calibration applies —
then, each closed until opened: its recipe and command, the load report (loaded / new /
skipped tensors), the freeze plan and optimizer groups, the curves, the confusion matrix, the
per-class table, the reliability diagram and the most confidently wrong images with their
true and predicted labels. A sweep's page: the leaderboard (as wide as the window), its plot,
a link to each job's page.

Built from what the run dir holds (metrics.json, manifest.json, load_report.json,
evaluation.json, the PNGs), so `finetune report DIR` rebuilds it at any time, also
for a run dir someone sent. Everything is inline (images as data: URIs, no network, no
other file), every text from the run dir is HTML-escaped, a thumbnail is used only when it is
a PNG data URI, and the page runs no script (its Content-Security-Policy forbids any).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finetune.rundir import artifacts
from finetune.rundir.box_report import box_sections, figures_table, is_box_result
from finetune.rundir.html_parts import (
    count,
    esc,
    img,
    num,
    page,
    png_uri,
    read_json,
    section,
    short,
    table,
)
from finetune.rundir.mask_report import is_mask_result, mask_figures, mask_sections
from finetune.rundir.verdict import speed_line
from finetune.tasks.table import TASKS, task_of

REPORT = artifacts.REPORT
EVAL_FILE = "eval.json"  # what `finetune evaluate` writes into a run dir


def heatmap(classes: list[Any], counts: list[Any], normalized: list[Any]) -> str:
    """The confusion matrix as a table, each cell shaded by its share of the true class."""
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    rows = []
    for i, (name, row) in enumerate(zip(classes, counts, strict=False)):
        shares = normalized[i] if i < len(normalized) and isinstance(normalized[i], list) else []
        cells = []
        for j, cell in enumerate(row if isinstance(row, list) else []):
            share = shares[j] if j < len(shares) and isinstance(shares[j], int | float) else 0
            alpha = max(0.0, min(1.0, float(share)))
            color = "#fff" if alpha > 0.55 else "#222"
            mark = "" if i == j else ";outline:1px solid #c33" if cell else ""
            cells.append(f'<td class="n" style="background:rgba(31,119,180,{alpha:.2f});'
                         f'color:{color}{mark}">{num(cell)}</td>')
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>true \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


def command_of(manifest: dict[str, Any]) -> str:
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    overrides = manifest.get("overrides") if isinstance(manifest.get("overrides"), list) else []
    name = recipe.get("name") or "base"
    rest = [str(o) for o in overrides if not str(o).startswith("recipe=")]
    return " ".join(["python -m finetune", f"recipe={name}", *rest])


def _evaluation_sections(evaluation: dict[str, dict[str, Any]]) -> list[str]:
    """Per-class table, confusion matrix, reliability, wrong images of each evaluation
    (`evaluations`: label -> result)."""
    parts = {"confusion": [], "per-class": [], "calibration": [], "wrong": []}
    for split, result in evaluation.items():
        label = f"{split}: {result.get('images', '?')} images"
        rows = [[r.get("class"), r.get("precision"), r.get("recall"), r.get("f1"),
                 r.get("support")] for r in result.get("per_class", []) if isinstance(r, dict)]
        rows += [[f"{avg} avg", result.get(f"{avg}/precision"), result.get(f"{avg}/recall"),
                  result.get(f"{avg}/f1"), result.get("images")] for avg in ("macro", "weighted")]
        parts["per-class"].append(f"<h3>{esc(label)}</h3>" + table(
            ["class", "precision", "recall", "F1", "support"], rows, {1, 2, 3, 4}))
        confusion = result.get("confusion") or {}
        classes = confusion.get("classes") or []
        counts = confusion.get("counts") or []
        if classes and counts:
            parts["confusion"].append(f"<h3>{esc(label)}: rows true, columns predicted</h3>"
                                      + heatmap(classes, counts,
                                                confusion.get("normalized") or []))
        bins = [b for b in result.get("reliability", []) if isinstance(b, dict)
                and b.get("count")]
        temperature = result.get("temperature", 1.0)
        parts["calibration"].append(
            f"<h3>{esc(label)}: ECE {num(result.get('ece'))} (15 bins"
            f"{'' if temperature == 1.0 else f', temperature {num(temperature)}'})</h3>"
            + img(result.get("reliability_png"), f"reliability diagram, {split}")
            + table(["confidence bin", "images", "mean confidence", "accuracy"],
                     [[f"{num(b.get('low'), 3)} to {num(b.get('high'), 3)}", b.get("count"),
                       b.get("confidence"), b.get("accuracy")] for b in bins], {1, 2, 3}))
        wrong = [w for w in result.get("confidently_wrong", []) if isinstance(w, dict)]
        cells = "".join(
            f'<div class="wrong">{img(w.get("thumbnail"), str(w.get("item")), "thumb")}'
            f"true <b>{esc(w.get('label'))}</b><br>predicted <b class=\"bad\">"
            f"{esc(w.get('predicted'))}</b><br>{num(w.get('confidence'), 3)}<br>"
            f'<span class="muted">{esc(Path(str(w.get("item"))).name)}</span></div>'
            for w in wrong)
        parts["wrong"].append(f"<h3>{esc(label)}</h3>"
                              + (cells or '<p class="ok">no wrong prediction</p>'))
    titles = {"confusion": "Confusion matrix", "per-class": "Per class",
              "calibration": "Calibration (reliability)",
              "wrong": "Most confidently wrong"}
    splits = ", ".join(evaluation) or "no evaluation"
    return [section(k, titles[k], "".join(v) or '<p class="muted">(no evaluation)</p>', splits)
            for k, v in parts.items()]


def evaluations(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every evaluation of the run, each once, by label: the run's own (evaluation.json: val,
    test) and `finetune evaluate`'s last (eval.json), which takes the place of the run's figure
    for the same split of the same data (it is the newer one, calibrated or with tta) and
    stands beside them for other data."""
    found = read_json(run_dir / artifacts.EVALUATION, "evaluation")
    results = {k: v for k, v in found.items() if isinstance(v, dict) and "per_class" in v}
    evaluated = read_json(run_dir / EVAL_FILE, "evaluation")
    split = evaluated.get("split")
    if not isinstance(split, str) or "per_class" not in evaluated:
        return results
    data = evaluated.get("data") if isinstance(evaluated.get("data"), dict) else {}
    tta, temperature = evaluated.get("tta"), evaluated.get("temperature", 1.0)
    how = ", ".join(["finetune evaluate",
                     *([f"tta={tta}"] if tta not in (None, "none") else []),
                     *([f"temperature {num(temperature)}"] if temperature != 1.0 else [])])
    if data.get("overrides"):
        results[f"{split} of {data.get('root') or data.get('name')} ({how})"] = evaluated
    else:
        results.pop(split, None)
        results[f"{split} ({how})"] = evaluated
    return results


def _verdict(metrics: dict[str, Any], manifest: dict[str, Any],
             results: dict[str, dict[str, Any]]) -> str:
    """The first screen: what was trained on what, the figures (each split once), whether it
    can be used, whether a calibration applies."""
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    classes = manifest.get("class_names") if isinstance(manifest.get("class_names"), list) \
        else []
    where = " ".join(str(x) for x in (data.get("name"), data.get("root")) if x)
    test = metrics.get("test_images")
    facts = (f"task {manifest.get('task') or '—'} · model "
             f"{(manifest.get('model') or {}).get('name')} · data {where} · {len(classes)} "
             f"classes · images: train {metrics.get('train_images')}, val "
             f"{metrics.get('val_images')}, test {test if test is not None else 'none'}")
    boxes = any(is_box_result(r) for r in results.values())
    task = str(manifest.get("task") or metrics.get("task") or "")
    headline = str(metrics.get("metric") or "val/acc") if boxes \
        else (task_of(task).headline if task in TASKS else "val/acc")
    if boxes:  # a detector's: mAP figures, nothing to calibrate
        figures = figures_table(results)
    elif any(is_mask_result(r) for r in results.values()):  # a segmentation model's
        figures = mask_figures(results)
    elif results:
        figures = table(["evaluated on", "images", "accuracy", "macro F1", "ECE", "loss"],
                         [[label, r.get("images"), r.get("acc"), r.get("macro/f1"), r.get("ece"),
                           r.get("loss")] for label, r in results.items()], {1, 2, 3, 4, 5})
    else:  # a task without per-image evaluation (multi-label): its validation figures
        figures = table(["metric", "value"], [[k, v] for k, v in metrics.items()
                                               if k.startswith(("val/", "test/"))
                                               and isinstance(v, int | float)], {1})
    run = (f"{metrics.get('epochs')} epochs in {num(metrics.get('train_seconds'), 1)} s · best "
           f"{headline} {num(metrics.get(f'best/{headline}'))} at epoch "
           f"{metrics.get('best/epoch')} · "
           f"{count(metrics.get('trainable_params'))} of {count(metrics.get('total_params'))} "
           "parameters trained" + (f" · {speed}" if (speed := speed_line(metrics)) else ""))
    warnings = [w for w in metrics.get("warnings") or [] if isinstance(w, str)] \
        if isinstance(metrics.get("warnings"), list) else []
    status = metrics.get("status", "unknown")
    if status != "complete":
        errors = metrics.get("error") if isinstance(metrics.get("error"), list) else []
        box = ("badbox", f"<b>The run is {esc(status)}.</b>" + "".join(
            f"<p>{esc(e)}</p>" for e in errors))
    elif warnings:  # the first thing read: this run learned nothing worth using
        box = ("badbox", '<div id="warnings"><b>This model learned nothing usable yet:</b><ul>'
               + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>")
    elif any(label.startswith("test") for label in results):
        label, result = next((k, v) for k, v in results.items() if k.startswith("test"))
        box = ("tested", f"<b>Test accuracy {num(result.get('acc'))}</b> on the "
               f"{esc(result.get('images'))} test images (never trained on, never used to choose "
               f"the epoch or the settings; {esc(label)}).")
    else:
        box = ("", f"<b>Validated only: {headline} {num(metrics.get(headline))}.</b> There is "
               "no test split: the validation images chose the settings, so their figure is "
               "optimistic. " + ("Evaluate it on boxes it never saw (finetune evaluate run=DIR "
                                 "data=... data.root=...) for a figure to sign off." if boxes
                                 else "Hold some out (data.test_fraction=0.2, or a test/ "
                                 "folder) for a figure to sign off." if headline == "val/acc"
                                 else "Evaluate it on masks it never saw (finetune evaluate "
                                 "run=DIR data=mask_folders data.root=...) for a figure to "
                                 "sign off."))
    temperature = manifest.get("temperature", 1.0)
    calibration = manifest.get("calibration") if isinstance(manifest.get("calibration"),
                                                               dict) else {}
    if not results or boxes or any(is_mask_result(r) for r in results.values()):
        calibrated = ""
    elif temperature != 1.0:
        calibrated = (f"Calibrated: temperature {num(temperature)}, fitted on "
                      f"{calibration.get('fitted_on', 'val')} ({calibration.get('images')} "
                      "images); predict and export apply it.")  # escaped below, once
    else:
        calibrated = ("Not calibrated: the probabilities are the softmax of the logits "
                      "(`finetune evaluate run=DIR calibrate=true` fits a temperature).")
    return (f'<div id="verdict"><p class="muted">{esc(facts)}</p>'
            f'<div class="verdict {box[0]}">{box[1]}</div>{figures}'
            f'<p class="muted">{esc(run)}</p><p>{esc(calibrated)}</p></div>')


def run_report(run_dir: Path) -> str:
    """The page of one run dir, as HTML text."""
    metrics = read_json(run_dir / artifacts.METRICS, "metrics")
    manifest = read_json(run_dir / artifacts.MANIFEST, "manifest")
    load = read_json(run_dir / artifacts.LOAD_REPORT, "load report")
    results = evaluations(run_dir)
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    title = f"{recipe.get('name') or run_dir.name}: {metrics.get('status', 'unknown')}"
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    command = command_of(manifest)
    recipe_body = (f"<p><code>{esc(command)}</code></p>"
                   f"<p class=\"muted\">recipe {esc(recipe.get('file'))} sha256 "
                   f"{esc(str(recipe.get('sha256') or '')[:16])}</p>"
                   f"<details><summary>resolved config</summary><pre>"
                   f"{esc(yaml.safe_dump(config, sort_keys=False))}</pre></details>")
    counts = load.get("counts") if isinstance(load.get("counts"), dict) else {}
    fates = [[fate, counts.get(fate, 0), ", ".join(
        (s["key"] if isinstance(s, dict) else str(s)) for s in (load.get(fate) or [])[:8])
        + (" …" if len(load.get(fate) or []) > 8 else "")]
        for fate in ("loaded", "adapted", "shape_skipped", "missing", "unexpected", "excluded")
        if isinstance(load.get(fate), list)]
    weights_body = (f"<p>{esc(load.get('summary'))}</p><p class=\"muted\">from "
                    f"{esc(load.get('url') or load.get('path') or load.get('source'))} sha256 "
                    f"{esc(str(load.get('sha256') or '')[:16])}</p>"
                    + table(["fate", "tensors", "first keys"], fates, {1}))
    freeze = manifest.get("freeze") if isinstance(manifest.get("freeze"), dict) else {}
    stages = [s for s in freeze.get("stages") or [] if isinstance(s, dict)]
    optimizer = manifest.get("optimizer") if isinstance(manifest.get("optimizer"), dict) else {}
    groups = [g for g in optimizer.get("groups") or [] if isinstance(g, dict)]
    freeze_body = (f"<p>train from <code>{esc(freeze.get('train_from') or 'the first layer')}"
                   f"</code>, BatchNorm in the frozen part: {esc(freeze.get('bn'))}</p>"
                   + table(["from epoch", "what joins", "tensors", "group"],
                            [[s.get("epoch"), s.get("selector"), s.get("params"), s.get("name")]
                             for s in stages], {0, 2})
                   + (f"<p>optimizer {esc(optimizer.get('name'))}</p>" + table(
                       ["group", "from epoch", "lr", "weight decay", "tensors", "parameters"],
                       [[g.get("name"), g.get("join_epoch"), g.get("lr"),
                         g.get("weight_decay"), g.get("tensors"), g.get("parameters")]
                        for g in groups], {1, 2, 3, 4, 5}) if groups else ""))
    found_lr = metrics.get("lr_finder") if isinstance(metrics.get("lr_finder"), dict) else {}
    if found_lr:  # optim.lr=auto: the range test the rate came from
        rate = found_lr.get("suggested")
        rate_text = f"{rate:.3g}" if isinstance(rate, float) else "—"
        freeze_body += (f"<p>optim.lr=auto: {esc(rate_text)}, {esc(found_lr.get('rule'))}</p>"
                        + img(png_uri(run_dir / artifacts.LR_FIND), "learning-rate finder"))
    curves = img(png_uri(run_dir / artifacts.CURVES), "learning curves")
    sections = [
        section("recipe", "Recipe and command", recipe_body, command),
        section("weights", "Weights (load report)", weights_body, str(load.get("summary") or "")),
        section("freeze", "Freeze plan and optimizer groups", freeze_body,
                 f"train from {freeze.get('train_from') or 'the first layer'}"),
        section("curves", "Curves", curves, "loss and accuracy per epoch"),
    ]
    found = {k: v for k, v in results.items() if is_box_result(v)}  # a detector's
    masks = {k: v for k, v in results.items() if is_mask_result(v)}
    if masks or isinstance(metrics.get("val/iou_per_class"), dict):  # a segmentation model's
        sections += mask_sections(masks, metrics, run_dir)
    else:
        sections += box_sections(found) if found else _evaluation_sections(results)
    head = (f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(run_dir.resolve())} · created "
            f"{esc(manifest.get('created'))}</p>")
    return page(title, head + _verdict(metrics, manifest, results) + "".join(sections))


def write_run_report(run_dir: Path) -> Path:
    """Build and write report.html into the run dir (atomically)."""
    path = run_dir / REPORT
    artifacts.write_bytes(path, run_report(run_dir).encode())
    return path


WRAPPED = ("overrides", "warnings", "error")  # the leaderboard's free-text columns


def sweep_report(sweep_dir: Path, rows: list[dict[str, Any]], columns: list[str],
                 plot: Path | None) -> str:
    """The page of a sweep: the leaderboard (a link to each job's own page) and its plot."""
    # a column no job has a value in says nothing; the rest fit the window (cells wrap)
    columns = [c for c in columns if any(row.get(c) not in (None, "") for row in rows)]
    header = "".join(f"<th>{esc(c).replace('_', '_<wbr>')}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "job" and (sweep_dir / str(value) / REPORT).is_file():
                cells.append(f'<td><a href="{esc(str(value))}/{REPORT}">{esc(value)}</a></td>')
            else:
                cells.append(f'<td class="n">{short(value)}</td>' if isinstance(
                    value, int | float) and not isinstance(value, bool) else
                    f'<td class="{"t" if column in WRAPPED else "k"}">{esc(value)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    board = f'<table class="board"><tr>{header}</tr>{"".join(body)}</table>'
    title = f"sweep {sweep_dir.name}"
    image = img(png_uri(plot) if plot else None, "leaderboard plot")
    return page(title, f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(sweep_dir.resolve())}"
                 f"</p>{section('leaderboard', 'Leaderboard', board, opened=True)}"
                 f"{section('plot', 'Metric by split point', image, opened=True)}")
