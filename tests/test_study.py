"""The shared Optuna study of `sweep=optuna`: several processes on one study (SQLite in the
sweep dir, and a real PostgreSQL server), trials claimed once each, `n_trials` counted across
them, a crashed process's trial marked failed while the rest go on, resuming, pruning, and
what a recipe may not set. Sweeps run as real `python -m finetune -m` processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from conftest import REPO, read_json
from omegaconf import OmegaConf

from finetune.compose import gate
from finetune.sweeps import study as studies
from finetune.sweeps.leaderboard import report
from finetune.sweeps.optuna_sweeper import search_space

TINY = ["recipe=base", "data=fake", "data.fake_size=40", "data.fake_classes=4",
        "data.batch_size=20", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "eval.report=false", "sweep=optuna", "freeze.train_from=choice(layer4,fc)"]
POSTGRES_ENV = "FINETUNE_TEST_POSTGRES"  # set by .ci/run, which starts the server


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "finetune", "-m", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    return out


def trials_run(out: str) -> list[int]:
    """The trial numbers a sweep process launched (Hydra's `#N : overrides` lines)."""
    return [int(n) for n in re.findall(r"\t#(\d+) : ", out)]


def load(url: str, name: str = studies.DEFAULT_NAME) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def test_two_processes_share_the_sweep_dirs_study(tmp_path: Path) -> None:
    """Default storage (SQLite in the sweep dir): two processes on one sweep dir run
    disjoint trials whose total is n_trials, each in the dir of its number. Trial 4's job
    dir cannot be made (a file is in the way; a joblib worker that died raises the same way
    from the launcher): the process that claimed it says so in one line, marks it failed and
    goes on."""
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "4").write_text("in the way")
    args = [*TINY, "hydra.sweeper.n_trials=5", "hydra.sweep.dir=search"]
    first, second = start(tmp_path, *args), start(tmp_path, *args)
    outs = [finish(first), finish(second)]
    ran = [trials_run(out) for out in outs]
    assert not set(ran[0]) & set(ran[1]), ran
    assert sorted(ran[0] + ran[1]) == [0, 1, 2, 3, 4]
    lost = [out for out in outs if "trial(s) 4 failed in the launcher" in out]
    assert len(lost) == 1 and re.search(r"finetune: error: trial\(s\) 4 failed in the "
                                        r"launcher \(FileExistsError: .*\); the study goes "
                                        r"on", lost[0])
    sweep = tmp_path / "search"
    trials = load(f"sqlite:///{sweep / 'study.db'}").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 + ["FAIL"]
    for trial in trials[:4]:
        job = sweep / str(trial.number)
        assert f"sweep.trial={trial.number}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert read_json(job / "metrics.json")["val/acc"] == pytest.approx(trial.value)
        assert trial.user_attrs[studies.JOB]["dir"] == str(job.resolve())
    assert (sweep / "4").read_text() == "in the way"
    record = read_json(sweep / studies.TRIALS_FILE)
    assert record["n_trials"] == 5 and len(record["trials"]) == 5
    best = max(trials[:4], key=lambda t: t.value)
    assert f"best_value: {best.value}" in (sweep / "optimization_results.yaml").read_text()


@pytest.fixture(scope="module")
def postgres() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run starts a PostgreSQL server and "
                        "sets it")
        pytest.skip(f"no PostgreSQL server ({POSTGRES_ENV}; .ci/run starts one)")
    return url


def test_two_machines_share_one_study_in_postgresql(tmp_path: Path, postgres: str) -> None:
    """Two processes, each with its own sweep dir (as on two machines), one study in a real
    PostgreSQL server: disjoint trials, n_trials in all, and either leaderboard lists them
    all (the other machine's from the study)."""
    name = f"two-machines-{os.getpid()}-{time.time_ns()}"
    args = [*TINY, "hydra.sweeper.n_trials=4", f"sweep.storage={postgres}",
            f"sweep.study_name={name}"]
    first = start(tmp_path, *args, "hydra.sweep.dir=a")
    second = start(tmp_path, *args, "hydra.sweep.dir=b")
    outs = [finish(first), finish(second)]
    ran = [trials_run(out) for out in outs]
    assert not set(ran[0]) & set(ran[1]) and sorted(ran[0] + ran[1]) == [0, 1, 2, 3], ran
    assert sorted(p.name for d in "ab" for p in (tmp_path / d).iterdir() if p.name.isdigit()) \
        == ["0", "1", "2", "3"]
    study = load(postgres, name)
    assert len(study.trials) == 4
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert f"study {name} (" in outs[0] and "password" not in outs[0]
    boards = [report(tmp_path / d)["rows"] for d in "ab"]
    for d, rows, theirs in zip("ab", boards, reversed(ran), strict=True):
        assert len(rows) == 4  # each machine's leaderboard has the other's trials too, from
        remote = [r for r in rows if not (tmp_path / d / r[1]).is_dir()]  # the study's record
        assert sorted(int(r[1]) for r in remote) == sorted(theirs)
        other = tmp_path / ("b" if d == "a" else "a")
        assert all(f"in {(other / r[1]).resolve()}" in r[-1] for r in remote), remote
    # the process that finished last saw every trial complete (the other may have seen one
    # still running)
    assert any({r[2] for r in rows} == {"complete"} for rows in boards)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_claims_are_exclusive_under_concurrency(tmp_path: Path, backend: str,
                                                request: pytest.FixtureRequest) -> None:
    """Eight threads, each with its own connection, claim from one study at once: every
    trial is claimed exactly once (SQLite: each transaction takes the write lock first;
    without that, trials were claimed twice)."""
    url = f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else \
        request.getfixturevalue("postgres")
    name = f"claims-{time.time_ns()}"
    _, how = studies.open_study(studies.open_storage(url), name, "maximize", 40, [])
    assert how == "created"
    claimed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        storage = studies.open_storage(url)
        mine = optuna.load_study(study_name=name, storage=storage)
        while (number := studies.claim(mine, storage)) is not None:
            with lock:
                claimed.append(number)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(40))
    assert {t.state for t in load(url, name).trials} == {optuna.trial.TrialState.RUNNING}


def test_a_crashed_process_trial_is_failed_and_the_study_resumes(tmp_path: Path) -> None:
    """A process killed mid-trial leaves its trial RUNNING; the next process on the study
    (a resume) sees its heartbeat stop, marks it failed, and runs the rest."""
    args = [*TINY, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=search", "sweep.heartbeat=1"]
    doomed = start(tmp_path, *args, "trainer.max_epochs=200")
    metrics = tmp_path / "search" / "0" / "metrics.json"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and "running" in metrics.read_text()):
        assert doomed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    out = finish(start(tmp_path, *args))
    assert "joined: 1 running, 1 waiting" in out
    assert trials_run(out) == [1]
    states = [t.state.name for t in load(f"sqlite:///{tmp_path / 'search' / 'study.db'}").trials]
    assert states == ["FAIL", "COMPLETE"]
    rows = {r[1]: r for r in report(tmp_path / "search")["rows"]}
    assert rows["0"][2] == "failed" and "no heartbeat" in rows["0"][-1]
    assert rows["1"][2] == "complete"


def test_a_configuration_that_cannot_learn_is_pruned(tmp_path: Path) -> None:
    """Median pruning: the trial with a learning rate of 1e-12 (nothing moves; the schema
    refuses 0) is stopped before its last epoch, finishes as a run, and the leaderboard and
    the sweep's page say pruned with the epoch it reached; the one that learns runs on."""
    result = finish(start(
        tmp_path, "recipe=quickstart", "weights.source=none", "trainer.max_epochs=3",
        "trainer.limit_train_batches=8", "trainer.limit_val_batches=2", "sched.name=none",
        "data.batch_size=16", "freeze.train_from=layer4",  # layer4 and fc: quick epochs
        "trainer.enable_progress_bar=false", "eval.report=false", "sweep=optuna",
        "hydra.sweeper.n_trials=2",
        "optim.lr=choice(0.003,1e-12)",
        "hydra.sweeper.enqueue=[{optim.lr:0.003},{optim.lr:1e-12}]",
        "sweep.pruner.name=median", "sweep.pruner.startup_trials=1",
        "sweep.pruner.warmup_epochs=1", "hydra.sweep.dir=search"))
    sweep = tmp_path / "search"
    learns, stuck = load(f"sqlite:///{sweep / 'study.db'}").trials
    assert learns.params["optim.lr"] == "0.003" and stuck.params["optim.lr"] == "1e-12"
    assert learns.state.name == "COMPLETE" and len(learns.intermediate_values) == 3
    assert stuck.state.name == "PRUNED"
    # after the warm-up epoch, the first epoch it may be pruned at (a constant lr: the one
    # that learns is far ahead by then)
    epoch = stuck.user_attrs[studies.PRUNED]
    assert epoch == 2 and len(stuck.intermediate_values) == epoch
    metrics = read_json(sweep / "1" / "metrics.json")
    assert metrics["status"] == "complete" and metrics["epochs"] == epoch
    assert metrics["pruned"] == {"epoch": epoch, "of": 3, "metric": "val/acc",
                                 "value": pytest.approx(stuck.intermediate_values[epoch - 1],
                                                        abs=1e-6)}
    assert (sweep / "1" / "model.safetensors").is_file()
    assert f"pruned after epoch {epoch} of 3" in result
    board = report(sweep)
    rows = {r[1]: dict(zip(board["header"], r, strict=True)) for r in board["rows"]}
    assert rows["1"]["status"] == "pruned" and rows["1"]["stopped_early_at"] == epoch
    assert rows["0"]["status"] == "complete" and rows["0"]["epochs"] == 3
    assert "1 complete, 1 pruned" in report(sweep)["summary"]
    page = (sweep / "report.html").read_text()  # the sweep's page says so too
    assert '<td class="k">pruned</td>' in page


def test_the_search_space_reads_hydras_grammar() -> None:
    space = search_space(["freeze.train_from=null,layer4,fc", "optim.lr=tag(log, interval(1e-4, "
                          "1e-2))", "data.batch_size=range(16,65,16)", "seed=3",
                          "model.kwargs.dropout=choice(0.1,0.2)"])
    d = space.distributions
    assert d["freeze.train_from"].choices == ("null", "layer4", "fc")
    assert space.decoded["freeze.train_from"] == [None, "layer4", "fc"]
    assert (d["optim.lr"].low, d["optim.lr"].high, d["optim.lr"].log) == (1e-4, 1e-2, True)
    assert (d["data.batch_size"].low, d["data.batch_size"].high, d["data.batch_size"].step) \
        == (16, 64, 16)
    assert space.fixed == ["seed=3"]
    assert space.overrides({"freeze.train_from": "null", "optim.lr": 0.001,
                            "data.batch_size": 32}) == [
        "seed=3", "freeze.train_from=null", "optim.lr=0.001", "data.batch_size=32"]
    assert space.enqueued({"freeze.train_from": None, "model.kwargs.dropout": 0.2}, 0) == {
        "freeze.train_from": "null", "model.kwargs.dropout": "0.2"}
    assert space.outside({"freeze.train_from": "null", "optim.lr": 5.0,
                          "data.batch_size": 32}) == ["optim.lr=5.0"]
    assert space.outside({"freeze.train_from": "layer2"}) == ["freeze.train_from='layer2'"]
    # the command line replaces the search's entry for a key (as Hydra's sweepers do)
    narrowed = search_space(["freeze.train_from=null,layer4,fc", "optim.lr=0.1,0.2",
                             "freeze.train_from=fc", "optim.lr=choice(0.3,0.4)"])
    assert narrowed.fixed == ["freeze.train_from=fc"]
    assert list(narrowed.distributions) == ["optim.lr"]
    assert narrowed.distributions["optim.lr"].choices == ("0.3", "0.4")
    with pytest.raises(Exception, match=r"enqueue\[0\].seed: not a key the search varies"):
        space.enqueued({"seed": 1}, 0)
    with pytest.raises(Exception, match=r"not one of its choices \(None, layer4, fc\)"):
        space.enqueued({"freeze.train_from": "layer2"}, 0)


def test_storage_settings_are_checked_before_any_job() -> None:
    def problems(**sweep: object) -> list[str]:
        node = OmegaConf.create({"storage": None, "study_name": None, **sweep})
        return studies.sweep_problems(node, OmegaConf.create({"sampler": {"name": "tpe"}}))

    assert problems() == []
    assert problems(storage="postgresql://me:hunter2@db/x", study_name="s") == [
        "sweep.storage has a password in it, which would be written into every job's config "
        "and report; leave it out and give it to the driver another way (PGPASSWORD or "
        "~/.pgpass for PostgreSQL)"]
    assert problems(storage="postgresql://me@db/x") == [
        "sweep.storage=postgresql://me@db/x needs sweep.study_name: the name every process "
        "of the sweep shares (a new name starts a new study, an existing one resumes it)"]
    assert problems(study_name="two words")[0].startswith("sweep.study_name='two words'")
    assert studies.shown("postgresql://me:hunter2@db/x") == "postgresql://me:***@db/x"


def test_a_recipe_cannot_name_the_storage_or_enqueue_other_keys(tmp_path: Path) -> None:
    recipe = {"sweep": {"storage": "sqlite:////home/me/.bashrc", "trial": 3},
              "hydra": {"sweeper": {"enqueue": [{"optim.lr": 0.01}, {"hydra.run.dir": "/x"}],
                                    "sampler": {"name": "cmaes"}}}}
    found = gate.recipe_problems(recipe, "r.yaml")
    assert any(p.startswith("r.yaml: sweep.storage cannot be set in a received recipe")
               for p in found)
    assert any(p.startswith("r.yaml: sweep.trial cannot be set") for p in found)
    assert any("hydra.sweeper.enqueue[1].hydra.run.dir" in p for p in found)
    assert any("hydra.sweeper.sampler.name='cmaes': must be tpe, random or grid" in p
               for p in found)
    assert not any("enqueue[0]" in p for p in found)
    assert gate.recipe_problems({"sweep": {"study_name": "mine", "pruner": {"name": "median"}},
                                 "hydra": {"sweeper": {"enqueue": [{"optim.lr": 0.01}]}}},
                                "ok.yaml") == []


def test_trials_json_from_someone_else_is_only_data(tmp_path: Path) -> None:
    (tmp_path / studies.TRIALS_FILE).write_text(json.dumps({"trials": [
        {"number": 0, "state": "complete", "value": 0.5}, {"number": "x"}, "junk",
        {"number": 1, "state": 7}]}))
    assert list(studies.read_trials(tmp_path / studies.TRIALS_FILE)) == [0]
    (tmp_path / studies.TRIALS_FILE).write_text("{not json")
    assert studies.read_trials(tmp_path / studies.TRIALS_FILE) == {}


def test_wrong_settings_stop_the_sweep_before_any_trial(tmp_path: Path) -> None:
    """Every problem at once, one sentence each, exit 2, and no study created."""
    process = start(tmp_path, *TINY, "metric=val/loss", "sweep.storage=sqlite:///x.db",
                    "hydra.sweep.dir=search")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("finetune: error: ")]
    assert errors == [
        "finetune: error: sweep.storage=sqlite:///x.db needs sweep.study_name: the name every "
        "process of the sweep shares (a new name starts a new study, an existing one resumes "
        "it)",
        "finetune: error: hydra.sweeper.direction=maximize but the jobs return metric=val/loss, "
        "which is better lower; set hydra.sweeper.direction=minimize (or pick another metric)"]
    assert "Traceback" not in out
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "search" / "study.db").exists()


def test_a_trial_claimed_by_a_process_that_died_at_once_is_found_stale(tmp_path: Path) -> None:
    """Optuna finds a running trial stale only by its heartbeat: a claim records the first,
    so a process that dies between the claim and its job still leaves a trial others fail."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = studies.open_storage(url, heartbeat=1)
    study, _ = studies.open_study(storage, "stale", "maximize", 2, [])
    assert studies.claim(study, storage) == 0  # ... and this process "dies" here
    time.sleep(studies.GRACE * 1 + 1.5)  # SQLite's clock (CURRENT_TIMESTAMP) counts seconds
    studies.fail_stale(optuna.load_study(study_name="stale", storage=studies.open_storage(
        url, heartbeat=1)))
    assert [t.state.name for t in load(url, "stale").trials] == ["FAIL", "WAITING"]


def test_a_planted_trial_never_reaches_a_jobs_command_line(tmp_path: Path) -> None:
    """A study's database is shared, or comes with a sweep dir: a waiting trial enqueued
    there with values outside the search (an interpolation that would copy the environment
    into the run dir) is failed without running, one line said; the next trial runs."""
    url = f"sqlite:///{tmp_path / 's' / 'study.db'}"
    (tmp_path / "s").mkdir()
    study = optuna.create_study(study_name=studies.DEFAULT_NAME, storage=url,
                                direction="maximize")
    study.enqueue_trial({"freeze.train_from": "${oc.env:HOME}"})
    study.enqueue_trial({})
    study.set_user_attr(studies.BUDGET, 2)
    study.set_user_attr(studies.READY, True)
    out = finish(start(tmp_path, *TINY, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=s"))
    assert "finetune: error: trial 0 holds values outside the search (freeze.train_from: " \
        "'${oc.env:HOME}' not in ('layer4', 'fc').); it fails without running" in out
    assert [t.state.name for t in load(url).trials] == ["FAIL", "COMPLETE"]
    assert trials_run(out) == [1] and not (tmp_path / "s" / "0").exists()


def test_a_database_that_cannot_be_opened_is_one_sentence() -> None:
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError) as refused:
        studies.open_storage("postgresql://nobody@localhost:1/none")
    assert refused.value.problems[0].startswith(
        "sweep.storage=postgresql://nobody@localhost:1/none: the study's database cannot be "
        "opened (OperationalError: ")
    assert refused.value.problems[0].endswith(
        "check the URL, that the server runs and that you may connect")
