"""Sweeps through `python -m finetune -m`: one dir per job, failed jobs recorded while the
others run, the feature cache shared by jobs that can share it, the leaderboard of
`python -m finetune.report` (also of a sweep still running), and the searches and launchers
a recipe can name (Optuna run for real when its extra is installed; launchers composed)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import main_here, read_json, run_cli
from hydra import compose, initialize_config_dir

from finetune import locations
from finetune.commands.report import main as report_main
from finetune.compose.prepare import prepare, sweeper_problem
from finetune.errors import ConfigError
from finetune.sweeps.leaderboard import report

TINY = ["recipe=base", "data=fake", "data.fake_size=80", "data.fake_classes=4",
        "data.batch_size=16", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1"]
HAS_OPTUNA = importlib.util.find_spec("optuna") is not None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped split sweep, shrunk (random init, fake data; the command line replaces the
    recipe's search): three split points x two learning rates; one split point names no
    layer: its jobs fail."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", "recipe=digits_transfer_splits", "weights.source=none", *TINY[1:],
                     "head.num_classes=null", "data.train_size=null", "seed=0",
                     "freeze.train_from=fc,layer4,layer9", "optim.lr=0.01,0.03",
                     "hydra.sweep.dir=sweep", cwd=cwd)
    assert result.returncode == 1, result.stderr[-3000:]  # two jobs failed: it says so
    assert "finetune: error: 2 of 6 jobs did not finish (4, 5); each job's dir says why" \
        in result.stderr, result.stderr[-3000:]
    (cwd / "sweep" / "command.out").write_text(result.stdout)
    return cwd / "sweep"


def test_a_sweep_says_where_first_and_ends_with_its_leaderboard(sweep: Path) -> None:
    lines = (sweep / "command.out").read_text().splitlines()
    assert lines[0] == "finetune: sweep -> sweep/<job>  (while it runs: finetune report sweep)"
    end = lines.index("finetune: sweep done: sweep")
    assert end > max(i for i, line in enumerate(lines) if line.startswith("  run dir: "))
    assert lines[end + 1].startswith("rank  job  status")
    assert lines[-2] == "6 jobs: 4 complete, 2 failed; ranked by val/acc"
    assert (sweep / "leaderboard.csv").is_file()


def test_every_job_has_its_dir_and_a_failed_job_does_not_stop_the_sweep(sweep: Path) -> None:
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == ["0", "1", "2", "3", "4", "5"]
    metrics = [read_json(j / "metrics.json") for j in jobs]
    splits = [m.get("train_from") for m in metrics]
    assert [m["status"] for m in metrics] == ["complete"] * 4 + ["failed"] * 2
    assert splits[:4] == ["fc", "fc", "layer4", "layer4"]
    assert [m["lr"] for m in metrics[:4]] == [0.01, 0.03, 0.01, 0.03]
    assert all((j / "model.safetensors").is_file() for j in jobs[:4])
    assert not list(sweep.rglob("*.ckpt")), "a sweep job keeps its weights, not checkpoints"
    assert "freeze.train_from='layer9' matches no module" in metrics[4]["error"][0]
    # The cache: the first job (fc) computes its frozen prefix once and keeps, on the way,
    # the output of layer3 (the cut of the sweep's other split point, layer4): every other
    # job reads what it needs.
    caches = [m["feature_cache"] for m in metrics[:4]]
    assert [c["status"] for c in caches] == ["computed", "reused", "reused", "reused"]
    assert caches[0]["key"] == caches[1]["key"] != caches[2]["key"] == caches[3]["key"]
    assert caches[0]["stored"] == ["flatten", "layer3.1"] and caches[2]["stored"] == []
    assert len(list((sweep / "feature_cache").glob("*.npy"))) == 4  # 2 cuts x train, val


def test_the_leaderboard_ranks_every_job(sweep: Path) -> None:
    report_main([str(sweep)])
    with open(sweep / "leaderboard.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6
    complete = [r for r in table if r["status"] == "complete"]
    accs = [float(r["val_acc"]) for r in complete]
    assert accs == sorted(accs, reverse=True) and len(complete) == 4
    assert [r["status"] for r in table[4:]] == ["failed", "failed"]
    assert all("matches no module" in r["error"] for r in table[4:])
    for row in complete:  # each row is its job's own metrics.json
        metrics = read_json(sweep / row["job"] / "metrics.json")
        assert float(row["val_acc"]) == pytest.approx(metrics["val/acc"], abs=1e-4)
        assert int(row["trainable_params"]) == metrics["trainable_params"]
        assert row["overrides"] == (f"freeze.train_from={metrics['train_from']} "
                                    f"optim.lr={metrics['lr']}")
    fc = {int(r["trainable_params"]) for r in complete if r["train_from"] == "fc"}
    layer4 = {int(r["trainable_params"]) for r in complete if r["train_from"] == "layer4"}
    assert fc == {512 * 4 + 4} and min(layer4) > max(fc)
    markdown = (sweep / "leaderboard.md").read_text()
    assert markdown.count("\n| ") == 8 and "job 4 failed" in markdown  # header, rule, 6 jobs
    assert (sweep / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_the_leaderboard_of_a_sweep_still_running(sweep: Path, tmp_path: Path) -> None:
    """A job that stopped mid-run (metrics.json says running, metrics.csv has one epoch) and a
    job not started (only .hydra/) are listed with what they have."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("*.ckpt", "feature_cache"))
    running, pending = copy / "1", copy / "3"
    plan = read_json(running / "metrics.json")
    (running / "metrics.json").write_text(json.dumps({
        "status": "running", "train_from": plan["train_from"], "lr": plan["lr"],
        "trainable_params": plan["trainable_params"]}))
    with open(running / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    first_epoch = [r for r in rows if r["epoch"] and float(r["epoch"]) == 0]
    with open(running / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(first_epoch)
    for name in list(pending.iterdir()):
        if name.name != ".hydra":
            shutil.rmtree(name) if name.is_dir() else name.unlink()
    result = report(copy)
    by_job = {str(j.dir.name): j for j in result["jobs"]}
    assert by_job["1"].status == "running" and by_job["1"].epochs == 1
    epoch0 = next(float(r["val/acc"]) for r in first_epoch if r.get("val/acc"))
    assert by_job["1"].values["val/acc"] == pytest.approx(epoch0)
    assert by_job["3"].status == "pending" and by_job["3"].values == {}
    assert by_job["3"].train_from == "layer4"  # from the job's composed config
    assert [j.dir.name for j in result["jobs"]][-3:] == ["3", "4", "5"]  # unscored last
    assert "6 jobs: 2 complete, 1 running, 2 failed, 1 pending" in result["summary"]


def test_unreadable_job_dirs_are_listed_and_the_rest_ranked(sweep: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A metrics.json cut short (a full disk), one holding a list, an overrides.yaml that is
    an alias bomb: each is one `unreadable` row with why; the others still rank."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("*.ckpt", "feature_cache"))
    whole = (copy / "0" / "metrics.json").read_text()
    (copy / "0" / "metrics.json").write_text(whole[:40])
    (copy / "1" / "metrics.json").write_text("[1, 2]")
    (copy / "2" / ".hydra" / "overrides.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdef", "bcdefg", strict=True)))
    code, out, err = main_here("report", str(copy), capsys=capsys)
    assert code == 0, err
    by_job = {j.dir.name: j for j in report(copy)["jobs"]}
    assert [by_job[n].status for n in "012"] == ["unreadable"] * 3
    assert by_job["0"].error.startswith(f"metrics {copy / '0' / 'metrics.json'}: not valid "
                                        "JSON")
    assert by_job["1"].error.endswith("holds a JSON list, not an object; it was changed "
                                      "after the run")
    assert "expands to more than 100,000 values" in by_job["2"].error
    assert f"job 0 unreadable: metrics {copy / '0' / 'metrics.json'}: not valid JSON" in out
    ranked = [j for j in report(copy)["jobs"] if j.values.get("val/acc") is not None]
    assert ranked and all(j.dir.name not in "012" for j in ranked)
    assert "3 unreadable; ranked by val/acc" in out


def test_report_of_a_folder_without_jobs_says_so(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    for argv, message in (([str(tmp_path / "nope")], "no such folder"),
                          ([str(tmp_path)], "no job dirs in it"),
                          ([str(tmp_path), "metric=val/speed"], "no job dirs"),
                          ([], "give one sweep dir")):
        with pytest.raises(SystemExit) as stopped:
            report_main(argv)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("finetune report: error:") and message in err
        assert len(err.strip().splitlines()) == 1
    report_main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("finetune report: the leaderboard of a sweep")
    assert "usage: finetune report SWEEP_OR_RUN_DIR [metric=val/acc] [out=DIR]" in shown


def _compose(*overrides: str):
    with initialize_config_dir(str(locations.CONF_DIR), version_base="1.3"):
        return compose("config", overrides=prepare(list(overrides)), return_hydra_config=True)


def test_a_recipe_carries_its_search() -> None:
    cfg = _compose("recipe=digits_transfer_splits")
    assert dict(cfg.hydra.sweeper.params) == {
        "freeze.train_from": "null,layer1,layer2,layer3,layer4,fc", "seed": "0,1,2"}
    grid = _compose("recipe=digits_transfer", "sweep=splits_lr")
    assert dict(grid.hydra.sweeper.params) == {
        "freeze.train_from": "null,layer1,layer2,layer3,layer4,fc",
        "optim.lr": "3.0e-4,1.0e-3,3.0e-3"}


@pytest.mark.skipif(not HAS_OPTUNA, reason="optuna not installed (finetune[optuna])")
def test_optuna_direction_is_checked_against_the_metric() -> None:
    cfg = _compose("recipe=digits_transfer", "sweep=optuna")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.metric == "val/acc"
    assert sweeper_problem(cfg.hydra, cfg.metric) is None
    loss = _compose("recipe=digits_transfer", "sweep=optuna", "metric=val/loss")
    assert sweeper_problem(loss.hydra, loss.metric) == (
        "hydra.sweeper.direction=maximize but the jobs return metric=val/loss, which is better "
        "lower; set hydra.sweeper.direction=minimize (or pick another metric)")
    assert sweeper_problem(_compose("recipe=digits_transfer").hydra, "val/loss") is None


@pytest.mark.parametrize(("launcher", "plugin", "fields"), [
    ("slurm", "hydra_submitit_launcher", {"gpus_per_node": 1, "tasks_per_node": 1,
                                          "timeout_min": 240}),
    ("local", "hydra_submitit_launcher", {"gpus_per_node": 0, "cpus_per_task": 2}),
    ("parallel", "hydra_joblib_launcher", {"n_jobs": 2}),
])
def test_launcher_configs_compose(launcher: str, plugin: str, fields: dict) -> None:
    if importlib.util.find_spec(f"hydra_plugins.{plugin}") is None:
        pytest.skip(f"{plugin} not installed")
    cfg = _compose("recipe=digits_transfer", "sweep=splits", f"hydra/launcher={launcher}")
    assert plugin in cfg.hydra.launcher._target_
    assert {k: cfg.hydra.launcher[k] for k in fields} == fields
    assert cfg.hydra.sweeper.params["freeze.train_from"].startswith("null,layer1")


def test_a_recipe_cannot_reach_past_its_search(tmp_path: Path) -> None:
    """A shared recipe may carry a search, not code: Hydra keys that import or run something
    are refused before anything starts."""
    evil = tmp_path / "evil.yaml"
    evil.write_text("defaults:\n  - override /hydra/sweeper: finetune_optuna\n"
                    "  - override /hydra/callbacks: log_job_return\n"
                    "hydra:\n  sweeper:\n    sampler:\n      _target_: os.system\n"
                    "    params:\n      optim.lr: 0.1,0.2\n"
                    "  launcher:\n    setup: [touch pwned]\n"
                    "  job:\n    env_set:\n      LD_PRELOAD: evil.so\n")
    with pytest.raises(ConfigError) as refused:
        prepare([f"recipe={evil}"])
    why = ("cannot be set in a received recipe or run dir (it could run code or write outside "
           "the run dir); a recipe may set only hydra.run.dir, hydra.sweep.dir/subdir, "
           "hydra.sweeper.params and the search's size (docs/security.md lists them); set "
           "others on the command line if you mean it")
    assert refused.value.problems == [
        f"{evil}: defaults entry override /hydra/callbacks: a recipe may choose only the groups "
        "data, hydra/launcher, hydra/sweeper, logger, sweep, not 'hydra/callbacks'",
        f"{evil}: hydra.sweeper.sampler._target_ {why}",
        f"{evil}: hydra.launcher.setup {why}",
        f"{evil}: hydra.job {why}"]


def test_ranking_follows_the_metric_direction(tmp_path: Path) -> None:
    """Accuracy: highest first; loss: lowest first; jobs without the metric last."""
    from finetune.sweeps.leaderboard import Job, rank

    jobs = [Job(tmp_path / str(i), "complete", values={"val/acc": acc, "val/loss": loss})
            for i, (acc, loss) in enumerate([(0.5, 0.9), (0.9, 0.2), (0.7, 0.4)])]
    jobs.append(Job(tmp_path / "3", "failed"))
    assert [j.dir.name for j in rank(jobs, "val/acc")] == ["1", "2", "0", "3"]
    assert [j.dir.name for j in rank(jobs, "val/loss")] == ["1", "2", "0", "3"]
    jobs[0].values["val/loss"] = 0.1  # now the lowest loss, still the lowest accuracy
    assert next(j.dir.name for j in rank(jobs, "val/loss")) == "0"
    assert next(j.dir.name for j in rank(jobs, "val/acc")) == "1"


def test_the_jobs_learn_the_sweeps_split_points() -> None:
    """What the feature caches of a sweep's jobs keep for each other: the command line's
    split points when it gives them (as the sweepers run them), else the search's."""
    from omegaconf import OmegaConf

    from finetune.sweeps.callback import swept_split_points

    def of(task: list[str], params: dict) -> list[str]:
        return swept_split_points(OmegaConf.create(
            {"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}}))

    search = {"freeze.train_from": "null,layer1,fc", "seed": "0,1"}
    assert of(["recipe=x", "freeze.train_from=fc,layer4"], search) == ["fc", "layer4"]
    assert of(["recipe=x"], search) == ["null", "layer1", "fc"]
    assert of(["freeze.train_from=choice(layer2,layer3)"], {}) == ["layer2", "layer3"]
    assert of(["freeze.train_from=layer3"], {}) == ["layer3"]
    assert of(["optim.lr=0.1,0.2"], {}) == []
