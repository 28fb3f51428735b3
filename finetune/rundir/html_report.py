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

import base64
import html
import re
from pathlib import Path
from typing import Any

import yaml

from finetune.compose import safe_files
from finetune.errors import FinetuneError
from finetune.rundir import artifacts

REPORT = artifacts.REPORT
EVAL_FILE = "eval.json"  # what `finetune evaluate` writes into a run dir
MAX_IMAGE_BYTES = 16 << 20  # a plot of a run; anything larger is not one
_PNG_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/]+={0,2}")
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.5em}
h2{font-size:1.1em;display:inline;margin:0}summary{cursor:pointer;padding:.35em 0;
border-bottom:1px solid #ddd}section{margin-top:.3em}
.verdict{border:1px solid #ccc;border-radius:4px;padding:.2em 1em;margin:.6em 0}
.verdict.tested{border-color:#99a;background:#f6f7fb}.verdict.badbox{border-color:#d88;
background:#fdf3f3}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre{background:#f6f8fa;border-radius:3px}pre{padding:.6em;overflow:auto;max-height:28em}
img.plot{max-width:100%;border:1px solid #eee}.muted{color:#777}
.wrong{display:inline-block;margin:.4em;text-align:center;font-size:12px;vertical-align:top}
.wrong img{width:96px;height:96px;image-rendering:pixelated;border:2px solid #c33;display:block}
.bad{color:#b00}.ok{color:#070}section{overflow-x:auto}
table.board{width:100%;font-size:12px}table.board td,table.board th{padding:.2em .35em}
table.board td.n,table.board td.k{white-space:nowrap}table.board td.t{overflow-wrap:anywhere}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value if value is not None else "—")
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def _short(value: int | float) -> str:
    """A leaderboard number: 4 significant digits (a learning rate of 0.00072 stays
    readable), thousands separated."""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _num(value)


def png_uri(path: Path) -> str | None:
    """A PNG file of the run dir as a data: URI (None when absent or not a PNG)."""
    if not path.is_file() or path.is_symlink():
        return None
    with open(path, "rb") as handle:
        data = handle.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _img(uri: str | None, alt: str, cls: str = "plot") -> str:
    if not uri or not _PNG_URI.fullmatch(uri):
        return f'<p class="muted">({esc(alt)}: not available)</p>'
    return f'<img class="{cls}" alt="{esc(alt)}" src="{uri}">'


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{_num(v)}</td>' if i in numeric else f"<td>{esc(v)}</td>"
        for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def heatmap(classes: list[Any], counts: list[Any], normalized: list[Any]) -> str:
    """The confusion matrix as a table, each cell shaded by its share of the true class."""
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    rows = []
    for i, (name, row) in enumerate(zip(classes, counts, strict=False)):
        shares = normalized[i] if i < len(normalized) and isinstance(normalized[i], list) else []
        cells = []
        for j, count in enumerate(row if isinstance(row, list) else []):
            share = shares[j] if j < len(shares) and isinstance(shares[j], int | float) else 0
            alpha = max(0.0, min(1.0, float(share)))
            color = "#fff" if alpha > 0.55 else "#222"
            mark = "" if i == j else ";outline:1px solid #c33" if count else ""
            cells.append(f'<td class="n" style="background:rgba(31,119,180,{alpha:.2f});'
                         f'color:{color}{mark}">{_num(count)}</td>')
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>true \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


def _read(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return safe_files.load_json_object(path, what)
    except FinetuneError:
        return {}


def _section(key: str, title: str, body: str, line: str = "", opened: bool = False) -> str:
    """A part of the page: on a run's page closed until opened (its first screen is the
    verdict), its title and one line saying what it holds."""
    said = f' <span class="muted">{esc(line)}</span>' if line else ""
    return (f'<section id="{key}"><details{" open" if opened else ""}><summary><h2>'
            f"{esc(title)}</h2>{said}</summary>{body}</details></section>")


def _page(title: str, body: str) -> str:
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>")


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
        parts["per-class"].append(f"<h3>{esc(label)}</h3>" + _table(
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
            f"<h3>{esc(label)}: ECE {_num(result.get('ece'))} (15 bins"
            f"{'' if temperature == 1.0 else f', temperature {_num(temperature)}'})</h3>"
            + _img(result.get("reliability_png"), f"reliability diagram, {split}")
            + _table(["confidence bin", "images", "mean confidence", "accuracy"],
                     [[f"{_num(b.get('low'), 3)} to {_num(b.get('high'), 3)}", b.get("count"),
                       b.get("confidence"), b.get("accuracy")] for b in bins], {1, 2, 3}))
        wrong = [w for w in result.get("confidently_wrong", []) if isinstance(w, dict)]
        cells = "".join(
            f'<div class="wrong">{_img(w.get("thumbnail"), str(w.get("item")), "thumb")}'
            f"true <b>{esc(w.get('label'))}</b><br>predicted <b class=\"bad\">"
            f"{esc(w.get('predicted'))}</b><br>{_num(w.get('confidence'), 3)}<br>"
            f'<span class="muted">{esc(Path(str(w.get("item"))).name)}</span></div>'
            for w in wrong)
        parts["wrong"].append(f"<h3>{esc(label)}</h3>"
                              + (cells or '<p class="ok">no wrong prediction</p>'))
    titles = {"confusion": "Confusion matrix", "per-class": "Per class",
              "calibration": "Calibration (reliability)",
              "wrong": "Most confidently wrong"}
    splits = ", ".join(evaluation) or "no evaluation"
    return [_section(k, titles[k], "".join(v) or '<p class="muted">(no evaluation)</p>', splits)
            for k, v in parts.items()]


def evaluations(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every evaluation of the run, each once, by label: the run's own (evaluation.json: val,
    test) and `finetune evaluate`'s last (eval.json), which takes the place of the run's figure
    for the same split of the same data (it is the newer one, calibrated or with tta) and
    stands beside them for other data."""
    found = _read(run_dir / artifacts.EVALUATION, "evaluation")
    results = {k: v for k, v in found.items() if isinstance(v, dict) and "per_class" in v}
    evaluated = _read(run_dir / EVAL_FILE, "evaluation")
    split = evaluated.get("split")
    if not isinstance(split, str) or "per_class" not in evaluated:
        return results
    data = evaluated.get("data") if isinstance(evaluated.get("data"), dict) else {}
    tta, temperature = evaluated.get("tta"), evaluated.get("temperature", 1.0)
    how = ", ".join(["finetune evaluate",
                     *([f"tta={tta}"] if tta not in (None, "none") else []),
                     *([f"temperature {_num(temperature)}"] if temperature != 1.0 else [])])
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
    if results:
        figures = _table(["evaluated on", "images", "accuracy", "macro F1", "ECE", "loss"],
                         [[label, r.get("images"), r.get("acc"), r.get("macro/f1"), r.get("ece"),
                           r.get("loss")] for label, r in results.items()], {1, 2, 3, 4, 5})
    else:  # a task without per-image evaluation (multi-label): its validation figures
        figures = _table(["metric", "value"], [[k, v] for k, v in metrics.items()
                                               if k.startswith(("val/", "test/"))
                                               and isinstance(v, int | float)], {1})
    run = (f"{metrics.get('epochs')} epochs in {_num(metrics.get('train_seconds'), 1)} s · best "
           f"val/acc {_num(metrics.get('best/val/acc'))} at epoch {metrics.get('best/epoch')} · "
           f"{_count(metrics.get('trainable_params'))} of {_count(metrics.get('total_params'))} "
           "parameters trained")
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
        box = ("tested", f"<b>Test accuracy {_num(result.get('acc'))}</b> on the "
               f"{esc(result.get('images'))} test images (never trained on, never used to choose "
               f"the epoch or the settings; {esc(label)}).")
    else:
        box = ("", f"<b>Validated only: val/acc {_num(metrics.get('val/acc'))}.</b> There is no "
               "test split: the validation images chose the settings, so their figure is "
               "optimistic. Hold some out (data.test_fraction=0.2, or a test/ folder) for a "
               "figure to sign off.")
    temperature = manifest.get("temperature", 1.0)
    calibration = manifest.get("calibration") if isinstance(manifest.get("calibration"),
                                                               dict) else {}
    if not results:
        calibrated = ""
    elif temperature != 1.0:
        calibrated = (f"Calibrated: temperature {_num(temperature)}, fitted on "
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
    metrics = _read(run_dir / artifacts.METRICS, "metrics")
    manifest = _read(run_dir / artifacts.MANIFEST, "manifest")
    load = _read(run_dir / artifacts.LOAD_REPORT, "load report")
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
                    + _table(["fate", "tensors", "first keys"], fates, {1}))
    freeze = manifest.get("freeze") if isinstance(manifest.get("freeze"), dict) else {}
    stages = [s for s in freeze.get("stages") or [] if isinstance(s, dict)]
    optimizer = manifest.get("optimizer") if isinstance(manifest.get("optimizer"), dict) else {}
    groups = [g for g in optimizer.get("groups") or [] if isinstance(g, dict)]
    freeze_body = (f"<p>train from <code>{esc(freeze.get('train_from') or 'the first layer')}"
                   f"</code>, BatchNorm in the frozen part: {esc(freeze.get('bn'))}</p>"
                   + _table(["from epoch", "what joins", "tensors", "group"],
                            [[s.get("epoch"), s.get("selector"), s.get("params"), s.get("name")]
                             for s in stages], {0, 2})
                   + (f"<p>optimizer {esc(optimizer.get('name'))}</p>" + _table(
                       ["group", "from epoch", "lr", "weight decay", "tensors", "parameters"],
                       [[g.get("name"), g.get("join_epoch"), g.get("lr"),
                         g.get("weight_decay"), g.get("tensors"), g.get("parameters")]
                        for g in groups], {1, 2, 3, 4, 5}) if groups else ""))
    curves = _img(png_uri(run_dir / artifacts.CURVES), "learning curves")
    sections = [
        _section("recipe", "Recipe and command", recipe_body, command),
        _section("weights", "Weights (load report)", weights_body, str(load.get("summary") or "")),
        _section("freeze", "Freeze plan and optimizer groups", freeze_body,
                 f"train from {freeze.get('train_from') or 'the first layer'}"),
        _section("curves", "Curves", curves, "loss and accuracy per epoch"),
        *_evaluation_sections(results),
    ]
    head = (f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(run_dir.resolve())} · created "
            f"{esc(manifest.get('created'))}</p>")
    return _page(title, head + _verdict(metrics, manifest, results) + "".join(sections))


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
                cells.append(f'<td class="n">{_short(value)}</td>' if isinstance(
                    value, int | float) and not isinstance(value, bool) else
                    f'<td class="{"t" if column in WRAPPED else "k"}">{esc(value)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<table class="board"><tr>{header}</tr>{"".join(body)}</table>'
    title = f"sweep {sweep_dir.name}"
    image = _img(png_uri(plot) if plot else None, "leaderboard plot")
    return _page(title, f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(sweep_dir.resolve())}"
                 f"</p>{_section('leaderboard', 'Leaderboard', table, opened=True)}"
                 f"{_section('plot', 'Metric by split point', image, opened=True)}")
