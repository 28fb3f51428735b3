"""A shared Optuna study: where it lives, who runs which trial, and pruning.

`sweep=optuna` runs an Optuna study through finetune's own Hydra sweeper
(hydra_plugins/finetune_optuna). The study lives in Optuna's storage: SQLite in the sweep dir
by default (`study.db`), or any SQLAlchemy URL (`sweep.storage`; PostgreSQL for many
machines). Every process started with the same storage and `sweep.study_name` works on the
one study:

- the process that creates the study puts `n_trials` trials in its queue (WAITING; the
  first ones with `hydra.sweeper.enqueue`'s values) — creation is atomic in the database, so
  exactly one process does; the others join;
- a process claims a waiting trial by moving it to RUNNING, which the database lets one
  process do (Optuna's own transition, `set_trial_state_values`); the sampler picks its
  values then, from every trial so far: no trial runs twice, and the study ends with
  `n_trials` trials however many processes worked on it;
- a process records a heartbeat for each trial it runs; a trial whose process died (its
  heartbeat older than 3 x `sweep.heartbeat` s) is marked FAIL by the next process that
  looks (Optuna's `fail_stale_trials`), and the rest go on;
- a study that exists is resumed: starting the command again claims what is still waiting
  (a larger `hydra.sweeper.n_trials` adds trials to the queue).

Each job gets its trial's number (`sweep.trial`, set by the sweeper) and runs in the sweep
dir's subdir of that number. With a pruner (`sweep.pruner.name`), `PruneTrial` reports the
job's metric after every validation and ends a hopeless trial's training there: the job
finishes as a run (weights, metrics.json with `pruned`), and the trial is PRUNED.

Nothing here imports torch or Lightning at import time; Optuna is imported when used.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from finetune.compose import safe_files
from finetune.errors import FinetuneError
from finetune.rundir.artifacts import write_bytes, write_json

log = logging.getLogger("finetune")

STUDY_FILE = "study.db"  # the default storage, in the sweep dir
TRIALS_FILE = "trials.json"  # what the study holds, written by each sweep process at its end
DEFAULT_NAME = "finetune"
PRUNERS = ("none", "median", "halving")
SAMPLERS = ("tpe", "random", "grid")
BUDGET = "finetune:n_trials"  # study user attr: the trials the queue was filled with
READY = "finetune:ready"  # study user attr: the queue is filled
PRUNED = "finetune:pruned_epoch"  # trial user attr: the epochs a pruned trial trained
JOB = "finetune:job"  # trial user attr: host and run dir of the job
GRACE = 3  # a trial whose heartbeat is this many intervals old has lost its process
WAIT_FOR_QUEUE = 120.0  # seconds a joining process waits for the creator to fill the queue


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage: `sweep.storage`, else SQLite in the sweep dir."""
    if storage:
        return str(storage)
    return f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def shown(url: str) -> str:
    """A storage URL for logs and files: any password masked."""
    # lazy: comes with the optional optuna extra
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(an unreadable URL)"


def sweep_problems(sweep: Any, sweeper: Any) -> list[str]:
    """What is wrong with the study's settings (`sweep.*`, hydra.sweeper) before any job."""
    problems = []
    if sweep.storage:
        # lazy: comes with the optional optuna extra
        from sqlalchemy.engine import make_url

        try:
            url = make_url(str(sweep.storage))
        except Exception:
            return [f"sweep.storage={sweep.storage!r}: not a database URL; give e.g. "
                    "postgresql://user@host/dbname or sqlite:////abs/path/study.db"]
        if url.password:
            problems.append("sweep.storage has a password in it, which would be written into "
                            "every job's config and report; leave it out and give it to the "
                            "driver another way (PGPASSWORD or ~/.pgpass for PostgreSQL)")
        if not sweep.study_name:
            problems.append(f"sweep.storage={shown(str(sweep.storage))} needs "
                            "sweep.study_name: the name every process of the sweep shares "
                            "(a new name starts a new study, an existing one resumes it)")
    if sweep.study_name is not None and not _plain_name(sweep.study_name):
        problems.append(f"sweep.study_name={sweep.study_name!r}: use letters, digits, '_', "
                        "'.', '-' (at most 64)")
    sampler = str(sweeper.get("sampler", {}).get("name", "tpe"))
    if sampler not in SAMPLERS:
        problems.append(f"hydra.sweeper.sampler.name={sampler}: use one of "
                        f"{', '.join(SAMPLERS)}")
    return problems


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) is not None


def _quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created") and its experimental-API warnings are not
    for the user of a sweep: finetune prints what happened to the study itself."""

    # lazy: an optional extra (finetune[optuna])
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(url: str, heartbeat: int | None = None) -> Any:
    """Optuna's RDB storage at `url` (created if new); with a heartbeat when `heartbeat`."""
    # lazy: an optional extra (finetune[optuna])
    import optuna

    _quiet_optuna()
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):  # processes wait for each other's writes, not fail
        engine = {"connect_args": {"timeout": 120}}
    else:
        engine = {"pool_pre_ping": True}
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": int(heartbeat), "grace_period": GRACE * int(heartbeat)}
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
            if url.startswith("sqlite"):
                _serialize_sqlite(storage.engine)
            return storage
        except Exception as err:  # two processes creating Optuna's tables in a new database
            if attempt == 4 or not _creation_race(err):
                reason = " ".join(str(getattr(err, "orig", None) or err).split())[:300]
                raise FinetuneError(f"sweep.storage={shown(url)}: the study's database cannot "
                                    f"be opened ({type(err).__name__}: {reason}); check the "
                                    "URL, that the server runs and that you may connect"
                                    ) from None
            log.debug("study: %s while creating the storage's tables; again", err)
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def _serialize_sqlite(engine: Any) -> None:
    """Every SQLite transaction takes the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 starts a transaction only at the first write, so a read-then-update
    (Optuna's move of a WAITING trial to RUNNING: read the state, then write it) of two
    processes could both read WAITING and both claim the trial; a test with eight threads
    caught exactly that. This is SQLAlchemy's documented recipe for pysqlite's transactions,
    with IMMEDIATE: the second process waits, then reads RUNNING. (PostgreSQL locks the row:
    Optuna reads it FOR UPDATE.)"""
    # lazy: comes with the optional optuna extra
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners: closed, made again with them


def _creation_race(err: Exception) -> bool:
    """An error of CREATE TABLE / TYPE that another process's same statement caused."""
    # lazy: comes with the optional optuna extra
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(err, OperationalError):  # SQLite says so; a refused connection is no race
        return "already exists" in str(err)
    return isinstance(err, IntegrityError | ProgrammingError)


def make_pruner(pruner: Any) -> Any:
    """The Optuna pruner `sweep.pruner` names (NopPruner for none)."""
    # lazy: an optional extra (finetune[optuna])
    import optuna

    name = str(pruner.name)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(pruner.startup_trials),
                                           n_warmup_steps=int(pruner.warmup_epochs))
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=int(pruner.min_epochs), reduction_factor=int(pruner.reduction_factor))
    return optuna.pruners.NopPruner()


def make_sampler(name: str, seed: int | None, number: int,
                 grid: dict[str, list[Any]] | None = None) -> Any:
    """The sampler that picks trial `number`'s values: seeded by (seed, number), so a trial's
    values do not depend on which process claimed it, and two processes never draw the same
    random start."""
    # lazy: an optional extra (finetune[optuna])
    import optuna

    trial_seed = None if seed is None else (int(seed) * 1_000_003 + number) % 2**32
    if name == "random":
        return optuna.samplers.RandomSampler(seed=trial_seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid or {}, seed=trial_seed)
    return optuna.samplers.TPESampler(seed=trial_seed)


class Heartbeat:
    """Records a heartbeat for trials while their jobs run (a thread of this process)."""

    def __init__(self, storage: Any, trial_ids: list[int]) -> None:
        self.storage, self.trial_ids = storage, trial_ids
        self.interval = storage.get_heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="study-heartbeat")

    def _beat(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # a database hiccup: the next beat tries again
                    log.debug("study: heartbeat of trial %d failed: %s", trial_id, err)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def open_study(storage: Any, name: str, direction: str, n_trials: int,
               enqueue: list[dict[str, Any]]) -> tuple[Any, str]:
    """Create the study (and fill its queue) or join it; returns it and what happened."""
    # lazy: an optional extra (finetune[optuna])
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name)
        _wait_until_filled(study)
        if study.direction.name.lower() != direction:
            raise FinetuneError(f"study {name} in {shown(storage.url)} is "
                                f"{study.direction.name.lower()}d, but this sweep would "
                                f"{direction} (hydra.sweeper.direction); use the study's "
                                "direction or another sweep.study_name") from None
        budget = int(study.user_attrs.get(BUDGET, 0))
        if n_trials > budget:  # a resumed study asked for more trials
            for _ in range(n_trials - budget):
                study.enqueue_trial({}, skip_if_exists=False)
            study.set_user_attr(BUDGET, n_trials)
            return study, f"resumed; {n_trials - budget} trials added (now {n_trials})"
        return study, "joined"
    for params in enqueue[:n_trials]:
        study.enqueue_trial(params, skip_if_exists=False)
    for _ in range(n_trials - min(len(enqueue), n_trials)):
        study.enqueue_trial({}, skip_if_exists=False)
    study.set_user_attr(BUDGET, n_trials)
    study.set_user_attr(READY, True)
    return study, "created"


def _wait_until_filled(study: Any) -> None:
    """A process that joins a study another one is creating waits for its queue."""
    deadline = time.monotonic() + WAIT_FOR_QUEUE
    while not study.user_attrs.get(READY):
        if time.monotonic() > deadline:
            raise FinetuneError(f"study {study.study_name}: its queue of trials was never "
                                f"filled (the process that created it stopped within "
                                f"{WAIT_FOR_QUEUE:.0f} s of starting?); start the sweep "
                                "again with a new sweep.study_name")
        time.sleep(0.5)


def claim(study: Any, storage: Any) -> int | None:
    """Move one waiting trial of the study to RUNNING for this process; its number, or None
    when the queue is empty. The database lets exactly one process make the move."""
    # lazy: an optional extra (finetune[optuna])
    import optuna

    # lazy: an optional extra (finetune[optuna])
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for _ in range(20):  # SQLite may refuse a write that raced another: look again
        try:
            for frozen in storage.get_all_trials(study_id, deepcopy=False,
                                                 states=(TrialState.WAITING,)):
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id,
                                                                           frozen.number)
                try:
                    if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                        if storage.get_heartbeat_interval():  # from the first moment: a
                            storage.record_heartbeat(trial_id)  # trial without one is never
                        return frozen.number  # found stale if this process dies now
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
            return None
        except optuna.exceptions.StorageInternalError as err:
            log.debug("study: claiming a trial raced another process (%s); again", err)
            time.sleep(0.2)
    return None


def trial_of(study: Any, storage: Any, number: int) -> Any:
    """The live Trial `number` of the study (to suggest values in, report to, tell)."""
    # lazy: an optional extra (finetune[optuna])
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id,
                                                                               number))


def fail_stale(study: Any) -> None:
    """Mark the running trials whose process stopped beating as FAIL."""
    # lazy: an optional extra (finetune[optuna])
    import optuna

    try:
        optuna.storages.fail_stale_trials(study)
    except optuna.exceptions.StorageInternalError as err:
        log.debug("study: looking for stale trials failed (%s); next time", err)


def counts(study: Any) -> dict[str, int]:
    """How many trials of the study are in each state, lower case."""
    found: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        state = trial.state.name.lower()
        found[state] = found.get(state, 0) + 1
    return found


def trials_record(study: Any, storage_text: str) -> dict[str, Any]:
    """The study as data (trials.json): its name, storage (password masked), direction, and
    each trial's number, state, value, values, the epoch a pruned trial reached, its job."""
    trials = []
    for trial in study.get_trials(deepcopy=False):
        value = trial.value if trial.values and len(trial.values) == 1 else None
        trials.append({
            "number": trial.number, "state": trial.state.name.lower(),
            "value": value if value is None or math.isfinite(value) else None,
            "params": {k: v for k, v in trial.params.items()},
            "pruned_epoch": trial.user_attrs.get(PRUNED),
            "job": trial.user_attrs.get(JOB),
            "epochs_reported": len(trial.intermediate_values),
        })
    return {"study": study.study_name, "storage": storage_text,
            "direction": study.direction.name.lower(),
            "n_trials": study.user_attrs.get(BUDGET), "trials": trials}


def read_trials(path: Path) -> dict[int, dict[str, Any]]:
    """trials.json of a sweep dir (data only: a received one can only mislabel its rows),
    by trial number; {} when there is none or it cannot be read."""

    if not path.is_file():
        return {}
    try:
        data = safe_files.load_json_object(path, "trials")
    except Exception as err:
        log.warning("%s: not read (%s)", path, err)
        return {}
    found = {}
    for trial in data.get("trials", []) if isinstance(data.get("trials"), list) else []:
        if isinstance(trial, dict) and isinstance(trial.get("number"), int) and \
                isinstance(trial.get("state"), str):
            found[trial["number"]] = trial
    return found


def write_trials(study: Any, storage_text: str, sweep_dir: Path) -> Path:
    path = sweep_dir / TRIALS_FILE
    write_json(path, trials_record(study, storage_text))
    return path


def write_best(study: Any, sweep_dir: Path) -> Path | None:
    """optimization_results.yaml, as Hydra's Optuna sweeper writes it: the best finished
    trial's values and parameters (None while no trial has finished)."""


    try:
        best = study.best_trial
    except ValueError:
        return None
    path = sweep_dir / "optimization_results.yaml"
    write_bytes(path, yaml.safe_dump({"name": "optuna", "trial": best.number,
                                      "best_params": dict(best.params),
                                      "best_value": best.value}, sort_keys=False).encode())
    return path


# -- the job's side ---------------------------------------------------------------------------


def monitored(metric: str) -> str:
    """The per-epoch metric a job's `metric` is reported through (best/val/acc: val/acc)."""
    return "val/acc" if metric == "best/val/acc" else metric
