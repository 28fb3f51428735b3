"""The leaderboard of a sweep: one row per job found under a folder (a Hydra sweep dir, or any
folder of run dirs), ranked by the metric, with its fold means; written beside the jobs as
leaderboard.csv, .md, .png and report.html. Reads only what runs wrote (metrics.json,
metrics.csv, .hydra/), so a sweep still running, failed jobs and unreadable job dirs are
listed with their status (and why) and the rest still ranked."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.compose import safe_files
from finetune.errors import FinetuneError
from finetune.rundir import artifacts, html_report
from finetune.rundir.verdict import short
from finetune.sweeps.study import TRIALS_FILE, read_trials
from finetune.tasks.detection import MAP_METRICS
from finetune.tasks.instances import MASK_MAP_METRICS
from finetune.tasks.segmentation import MASK_METRICS

METRICS = ("val/acc", "val/loss", "val/f1", "val/acc_top5", "best/val/acc", "val/mAP",
           *MAP_METRICS, "best/val/map", *MASK_METRICS[:-1], "best/val/miou",
           *MASK_MAP_METRICS[:4], "best/val/mask_map")
PIXEL_METRICS = (*MASK_METRICS[:-1], "best/val/miou")  # a segmentation run's (not val/loss)
INSTANCE_METRICS = (*MASK_MAP_METRICS[:4], "best/val/mask_map")  # an instance segmenter's
# the three score columns: a classifier's, or a detector's (a segmentation model's, an instance
# segmenter's) when the jobs are ranked by a detection (segmentation, mask mAP) metric (the
# column names are leaderboard.csv's)
SCORES = {"labels": (("best_val_acc", "best/val/acc"), ("val_acc", "val/acc"),
                     ("val_loss", "val/loss")),
          "boxes": (("best_val_map", "best/val/map"), ("val_map", "val/map"),
                    ("val_map_50", "val/map_50")),
          "masks": (("best_val_miou", "best/val/miou"), ("val_miou", "val/miou"),
                    ("val_pixel_acc", "val/pixel_acc")),
          "instances": (("best_val_mask_map", "best/val/mask_map"),
                        ("val_mask_map", "val/mask_map"), ("val_map", "val/map"))}
ALL_LAYERS = "(all)"  # the split point of a job that trains every layer (train_from null)
COLUMNS = ("rank", "job", "status", "overrides", "train_from", "lr", "trainable_params",
           "trainable_share", "best_val_acc", "val_acc", "val_loss", "warnings", "epochs",
           "stopped_early_at", "train_seconds", "error")


@dataclass
class Job:
    """What one job dir says about itself."""

    dir: Path
    status: str  # complete | failed | running | pending
    overrides: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)  # metric name -> number
    train_from: str | None = None
    lr: float | None = None
    trainable_params: int | None = None
    trainable_share: float | None = None  # of all parameters (an adapter's included)
    epochs: int | None = None
    stopped_at: int | None = None  # the epoch early stopping ended the run, if it did
    train_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)  # metrics.json's: learned nothing
    error: str = ""
    metric: str | None = None  # the metric the job was told to return


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


STATUSES = ("complete", "running", "failed", "interrupted", "pending")


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    listed = safe_files.load_yaml(path, "overrides") or []
    if not isinstance(listed, list):
        raise FinetuneError(f"{path}: not a list of overrides")
    return dict(str(o).partition("=")[::2] for o in listed if "=" in str(o))


def _composed(job_dir: Path) -> dict[str, Any]:
    path = job_dir / ".hydra" / "config.yaml"
    config = (safe_files.load_yaml(path, "config") or {}) if path.is_file() else {}
    if not isinstance(config, dict):
        raise FinetuneError(f"{path}: not a mapping of config keys")
    return config


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_job(job_dir: Path) -> Job:
    """A job from its dir, finished or not. A dir that cannot be read (it may come from
    someone else, or have been cut short by a full disk) is a job with status `unreadable`
    and the reason as its error: listed, never stopping the leaderboard."""
    try:
        return _read_job(job_dir)
    except Exception as err:  # any damage: the rest of the sweep is still reported
        reason = str(err) if isinstance(err, FinetuneError) else f"{type(err).__name__}: {err}"
        return Job(job_dir, "unreadable", error=" ".join(reason.split())[:300])


def _read_job(job_dir: Path) -> Job:
    metrics_file = job_dir / artifacts.METRICS
    metrics = (safe_files.load_json_object(metrics_file, "metrics")
               if metrics_file.is_file() else {})
    config = _composed(job_dir)
    freeze, optim = _mapping(config.get("freeze")), _mapping(config.get("optim"))
    status = metrics.get("status", "pending")
    if status not in STATUSES:
        raise FinetuneError(f"{metrics_file}: status {status!r} is not one of "
                            f"{', '.join(STATUSES)}")
    job = Job(job_dir, status, _overrides(job_dir))
    train_from = metrics.get("train_from", freeze.get("train_from"))
    job.train_from = train_from if isinstance(train_from, str) or train_from is None else None
    job.lr = _number(metrics.get("lr", optim.get("lr")))
    job.trainable_params = _whole(metrics.get("trainable_params"))
    total = _whole(metrics.get("total_params"))
    job.trainable_share = (job.trainable_params / total if total and job.trainable_params
                           is not None else None)
    job.metric = metrics.get("metric") if isinstance(metrics.get("metric"), str) else None
    if job.status == "failed":
        errors = metrics.get("error", [])
        job.error = " ".join(" ".join(map(str, errors if isinstance(errors, list)
                                          else [errors])).split())
    if job.status == "complete":
        job.values = {k: _number(metrics.get(k)) for k in METRICS}
        job.epochs, job.train_seconds = (_whole(metrics.get("epochs")),
                                         _number(metrics.get("train_seconds")))
        job.stopped_at = _whole(_mapping(metrics.get("early_stopping")).get("stopped_epoch"))
        warnings = metrics.get("warnings")
        job.warnings = [w for w in warnings if isinstance(w, str)] \
            if isinstance(warnings, list) else []
        pruned = _whole(_mapping(metrics.get("pruned")).get("epoch"))
        if pruned is not None:  # the study's pruner ended it: ranked, shown as pruned
            job.status, job.stopped_at = "pruned", pruned
    else:  # running, or stopped: what its per-epoch log holds so far
        series = artifacts.epoch_metrics(job_dir / artifacts.METRICS_CSV)
        accs = series.get("val/acc", {})
        if accs:
            last = max(accs)
            job.epochs = last + 1
            job.values = {k: series[k][last] for k in METRICS if last in series.get(k, {})}
            job.values["best/val/acc"] = max(accs.values())
    return job


def find_jobs(root: Path) -> list[Job]:
    """Every job dir under `root`: a dir with .hydra/ or metrics.json, in job order."""
    dirs = {p.parent.parent if p.name == "overrides.yaml" else p.parent
            for pattern in ("**/.hydra/overrides.yaml", f"**/{artifacts.METRICS}")
            for p in root.glob(pattern)}
    dirs = {d for d in dirs if not any(d != o and o in d.parents for o in dirs)}

    def order(path: Path) -> tuple[Any, ...]:
        parts = path.relative_to(root).parts
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)

    return [read_job(d) for d in sorted(dirs, key=order)]


HIDDEN_KEYS = ("sweep.trial",)  # set by the sweeper: the job dir's name already says it


def with_study(jobs: list[Job], trials: dict[int, dict[str, Any]], root: Path, metric: str
               ) -> list[Job]:
    """The jobs as the study sweep's trials.json sees them: a trial the study marked failed
    (its process stopped beating) or pruned says so, and a trial run elsewhere (another
    machine's sweep dir) is a row of its own from what the study holds."""
    if not trials:
        return jobs
    by_number = {int(j.dir.name): j for j in jobs if j.dir.parent == root and j.dir.name.isdigit()}
    params = {str(k) for t in trials.values() for k in _mapping(t.get("params"))}
    fixed = {k: v for k, v in (jobs[0].overrides.items() if jobs else ()) if k not in params}
    for number, trial in sorted(trials.items()):
        job = by_number.get(number)
        state = trial["state"]
        if job is None:
            where = _mapping(trial.get("job"))
            job = Job(root / str(number), {"complete": "complete", "pruned": "pruned",
                                           "fail": "failed", "running": "running"}.get(
                                               state, "pending"),
                      {**fixed, **{str(k): str(v)
                                   for k, v in _mapping(trial.get("params")).items()}},
                      error=f"on {where.get('host')} in {where.get('dir')}"
                      if where.get("host") else "not run in this sweep dir")
            value = _number(trial.get("value"))
            if value is not None:
                job.values[metric] = value
            job.stopped_at = _whole(trial.get("pruned_epoch"))
            jobs.append(job)
        elif state == "fail" and job.status in ("running", "pending"):
            job.status = "failed"
            job.error = ("its process stopped (no heartbeat, or the launcher lost it): the "
                         "study marked the trial failed")
        elif state == "pruned" and job.status == "complete":
            job.status = "pruned"
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose values differ between jobs (what the sweep varied)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys and k not in HIDDEN_KEYS]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def rank(jobs: list[Job], metric: str) -> list[Job]:
    """Best first by `metric` (lower is better for a loss); jobs without it last, in order."""
    sign = 1.0 if metric.endswith("loss") else -1.0
    scored = [j for j in jobs if j.values.get(metric) is not None]
    unscored = [j for j in jobs if j.values.get(metric) is None]
    return sorted(scored, key=lambda j: sign * j.values[metric]) + unscored


def split_label(train_from: Any) -> str:
    return ALL_LAYERS if train_from in (None, "null", "None") else str(train_from)


def scores_of(metric: str) -> tuple[tuple[str, str], ...]:
    """The score columns of a leaderboard ranked by `metric` (SCORES)."""
    if metric in PIXEL_METRICS:
        return SCORES["masks"]
    if metric in INSTANCE_METRICS:
        return SCORES["instances"]
    return SCORES["boxes" if metric in (*MAP_METRICS, "best/val/map") else "labels"]


def columns(metric: str) -> list[str]:
    """leaderboard.csv's header for jobs ranked by `metric`: COLUMNS, its score columns
    those of the metric's kind."""
    names = [name for name, _ in scores_of(metric)]
    start = COLUMNS.index("best_val_acc")
    return [*COLUMNS[:start], *names, *COLUMNS[start + 3:]]


def rows(jobs: list[Job], root: Path, keys: list[str], metric: str = "val/acc"
         ) -> list[list[Any]]:
    def fmt(value: Any, digits: int = 4) -> Any:
        return "" if value is None else round(value, digits) if isinstance(value, float) \
            else value

    out = []
    for i, job in enumerate(jobs, 1):
        out.append([
            i, str(job.dir.relative_to(root)) or ".", job.status,
            " ".join(f"{k}={job.overrides[k]}" for k in keys if k in job.overrides),
            split_label(job.train_from), "" if job.lr is None else float(f"{job.lr:.4g}"),
            fmt(job.trainable_params), fmt(job.trainable_share, 6),
            *(fmt(job.values.get(key)) for _, key in scores_of(metric)),
            short(job.warnings), fmt(job.epochs),
            fmt(job.stopped_at),
            fmt(job.train_seconds, 1),
            job.error,
        ])
    return out


def text_table(header: list[str], body: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], body: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


# A plot's legend lists at most this many lines: an Optuna study draws a new learning rate for
# every trial, and a line (and legend entry) per value would bury the plot.
LEGEND_ENTRIES = 6


def lr_lines(scored: list[Job]) -> list[float | None]:
    """The learning rates that get a line of their own in the split-point plot: each, when
    there are a few (a grid); none (one line, the mean of all) when there are more."""
    lrs = sorted({j.lr for j in scored if j.lr is not None})
    return lrs if len(lrs) <= LEGEND_ENTRIES else [None]


def plot(jobs: list[Job], metric: str, keys: list[str], path: Path) -> bool:
    """leaderboard.png: the metric per split point (every job a dot, the mean a line; the
    split points ordered from most to fewest trainable parameters), and against the learning
    rate when it was swept. False when no job has the metric yet."""
    scored = [j for j in jobs if j.values.get(metric) is not None]
    if not scored:
        return False
    # matplotlib on the Agg backend, as plots sets it up
    # lazy: matplotlib is slow to import; only a leaderboard with a plot needs it
    from finetune.rundir.plots import plt, save_png


    lr_swept = "optim.lr" in keys or len({j.lr for j in scored}) > 1
    fig, axes = plt.subplots(1, 2 if lr_swept else 1, figsize=(11 if lr_swept else 6.5, 4),
                             squeeze=False)
    size: dict[str, int] = {}
    for job in scored:
        label = split_label(job.train_from)
        size[label] = max(size.get(label, -1), job.trainable_params or -1)
    splits = sorted(size, key=lambda s: (-size[s], s))
    ax = axes[0][0]
    lrs = lr_lines(scored) if lr_swept else [None]
    for lr in lrs:
        group = [j for j in scored if lr is None or j.lr == lr]
        xs = [splits.index(split_label(j.train_from)) for j in group]
        ax.scatter(xs, [j.values[metric] for j in group], alpha=0.6, s=22)
        means = [(i, [j.values[metric] for j, x in zip(group, xs, strict=True) if x == i])
                 for i in range(len(splits))]
        means = [(i, sum(v) / len(v)) for i, v in means if v]
        ax.plot([i for i, _ in means], [m for _, m in means], marker="o",
                label=f"lr {lr:g} (mean)" if lr is not None else "mean")
    ax.set_xticks(range(len(splits)))
    ax.set_xticklabels([f"{s}\n{size[s]:,} p" if size[s] >= 0 else s for s in splits],
                       fontsize=8)
    ax.set(xlabel="freeze.train_from (trainable parameters)", ylabel=metric,
           title=f"{metric} by split point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if lr_swept:
        ax = axes[0][1]
        for split in splits:
            group = sorted((j for j in scored if split_label(j.train_from) == split
                            and j.lr is not None), key=lambda j: j.lr)
            ax.plot([j.lr for j in group], [j.values[metric] for j in group], marker="o",
                    label=split, alpha=0.8)
        ax.set(xscale="log", xlabel="optim.lr", ylabel=metric, title=f"{metric} by learning rate")
        ax.grid(alpha=0.3)
        if len(splits) <= LEGEND_ENTRIES:
            ax.legend(fontsize=8, title="train_from")
    save_png(fig, path)
    return True


def default_metric(jobs: list[Job]) -> str:
    """The metric the jobs were told to return (`metric`), val/acc if none says."""
    return next((job.metric for job in jobs if job.metric), "val/acc")


def report(root: Path, metric: str = "", out: Path | None = None) -> dict[str, Any]:
    """Write the leaderboard files for the sweep at `root`; returns what was written."""
    if not root.is_dir():
        raise FinetuneError(f"{root}: no such folder; give a sweep dir, e.g. "
                            "outputs/sweeps/<recipe>/<time>")
    jobs = find_jobs(root)
    if not jobs:
        raise FinetuneError(f"{root}: no job dirs in it (none has .hydra/ or metrics.json); "
                            "give the dir a sweep printed at its start")
    metric = metric or default_metric(jobs)
    if metric not in METRICS:
        raise FinetuneError(f"metric={metric}: not one of {', '.join(METRICS)}")
    jobs = with_study(jobs, read_trials(root / TRIALS_FILE), root, metric)
    keys = swept_keys(jobs)
    ranked = rank(jobs, metric)
    header, body = columns(metric), rows(ranked, root, keys, metric)
    out = out or root
    artifacts.write_csv(out / "leaderboard.csv", header, body)
    counts = {s: sum(j.status == s for j in jobs)
              for s in (*STATUSES, "pruned", "unreadable")}
    summary = (f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
               + f"; ranked by {metric}")
    folds = fold_table(jobs, metric, keys)
    if folds:
        artifacts.write_csv(out / "leaderboard_folds.csv", folds[0], folds[1])
    artifacts.write_bytes(out / "leaderboard.md", (
        f"# Leaderboard: {root}\n\n{summary}; swept: {', '.join(keys) or 'nothing'}\n\n"
        + markdown_table(header[:-1], [r[:-1] for r in body])
        + "".join(f"\n- job {r[1]} {r[2]}: {r[-1]}" for r in body if r[-1])
        + ("\n" if any(r[-1] for r in body) else "")
        + (f"\n## By configuration, across folds ({metric})\n\n" + markdown_table(*folds)
           if folds else "")).encode())
    plotted = plot(jobs, metric, keys, out / "leaderboard.png")
    page = sweep_page(root, out, ranked, header, body, out / "leaderboard.png" if plotted
                      else None)
    return {"jobs": ranked, "header": header, "rows": body, "summary": summary, "metric": metric,
            "folds": folds,
            "files": [out / "leaderboard.csv", out / "leaderboard.md",
                      *([out / "leaderboard.png"] if plotted else []),
                      *([out / "leaderboard_folds.csv"] if folds else []), page]}


def sweep_page(root: Path, out: Path, jobs: list[Job], header: list[str], body: list[list[Any]],
               plot_file: Path | None) -> Path:
    """report.html of the sweep, linking each job's page (built first where a finished job
    has none)."""

    for job in jobs:
        if job.status == "complete" and (job.dir / artifacts.MANIFEST).is_file() and \
                not (job.dir / artifacts.REPORT).is_file():
            html_report.write_run_report(job.dir)
    page = out / artifacts.REPORT
    text = html_report.sweep_report(root, [dict(zip(header, r, strict=True)) for r in body],
                                    [c for c in header if c != "error"], plot_file)
    artifacts.write_bytes(page, text.encode())
    return page


def is_run_dir(path: Path) -> bool:
    """A run dir (its manifest.json), not a sweep of them."""
    return (path / artifacts.MANIFEST).is_file()


FOLD_KEY = "data.fold"


def fold_table(jobs: list[Job], metric: str, keys: list[str]
               ) -> tuple[list[str], list[list[Any]]] | None:
    """k-fold sweeps: one row per configuration (the swept overrides but data.fold), its
    metric's mean and standard deviation across the folds that finished, best first; None
    when no job is a fold."""
    if not any(FOLD_KEY in job.overrides for job in jobs):
        return None
    config_keys = [k for k in keys if k != FOLD_KEY]
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.overrides.get(k, "") for k in config_keys), []).append(job)
    rows = []
    for config, members in groups.items():
        values = [j.values[metric] for j in members if j.values.get(metric) is not None]
        mean = sum(values) / len(values) if values else None
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
               if mean is not None and len(values) > 1 else None)
        rows.append([" ".join(f"{k}={v}" for k, v in zip(config_keys, config, strict=True)
                              if v) or "(one configuration)", len(members), len(values),
                     round(mean, 4) if mean is not None else "",
                     round(std, 4) if std is not None else "",
                     f"{mean:.4f} ± {std:.4f}" if std is not None else ""])
    sign = 1.0 if metric.endswith("loss") else -1.0
    rows.sort(key=lambda r: (r[3] == "", sign * r[3] if r[3] != "" else 0.0, r[0]))
    header = ["configuration", "jobs", "folds_done", f"mean_{metric}", f"std_{metric}",
              "mean ± std"]
    return ["rank", *header], [[i, *r] for i, r in enumerate(rows, 1)]


def print_leaderboard(result: dict[str, Any]) -> None:
    """The table, each failed job's error, the summary and the files written."""
    shown = [c for c in result["header"] if c != "error"]
    print(text_table(shown, [r[:len(shown)] for r in result["rows"]]))
    for row in result["rows"]:
        if row[-1]:
            print(f"job {row[1]} {row[2]}: {row[-1]}")
    if result.get("folds"):
        print(f"\nby configuration, across folds ({result['metric']}):")
        print(text_table(*result["folds"]))
    print(f"{result['summary']}\nwritten: " + "  ".join(str(f) for f in result["files"]))

