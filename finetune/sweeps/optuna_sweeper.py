"""The sweeper behind `sweep=optuna`: trials claimed from a shared Optuna study, run as jobs.

Hydra instantiates hydra_plugins/finetune_optuna's FinetuneOptunaSweeper with
`hydra.sweeper`'s settings; it hands the work to StudySweeper here. The search space is
written as for Hydra's own Optuna sweeper (`hydra.sweeper.params` and the command line:
`key=choice(a,b)`, `key=tag(log, interval(1e-4, 1e-2))`, `key=range(1,5)`, `key=a,b`; any
other override is the same for every trial). finetune/sweeps/study.py says how processes share the
study.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from finetune.compose.prepare import sweeper_problem
from finetune.errors import FinetuneError
from finetune.rundir.artifacts import is_disk_full
from finetune.sweeps import study as studies

log = logging.getLogger("finetune")


@dataclass
class Space:
    """The search: Optuna distributions by key, the decoded value of each choice (to match
    enqueued values), and the overrides every trial gets as they are."""

    distributions: dict[str, Any] = field(default_factory=dict)
    decoded: dict[str, list[Any]] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        # lazy: an optional extra (finetune[optuna])
        from optuna.distributions import CategoricalDistribution

        out = []
        for key, value in params.items():
            if isinstance(self.distributions.get(key), CategoricalDistribution):
                out.append(f"{key}={value}")  # the choice as the command line wrote it
            else:
                out.append(f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}")
        return [*self.fixed, *out]

    def outside(self, params: dict[str, Any]) -> list[str]:
        """The values of a claimed trial that are not in the search: a study's database is
        shared (or came with a sweep dir), and an enqueued trial's fixed values go to the jobs'
        command lines as they are. A choice must be one of the choices, a number a number in
        its interval."""
        # lazy: an optional extra (finetune[optuna])
        from optuna.distributions import CategoricalDistribution

        found = []
        for key, value in params.items():
            distribution = self.distributions.get(key)
            if isinstance(distribution, CategoricalDistribution):
                ok = value in distribution.choices
            elif distribution is not None:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and \
                    distribution.low <= value <= distribution.high
            else:
                ok = False
            if not ok:
                found.append(f"{key}={value!r}")
        return found

    def grid(self) -> dict[str, list[Any]] | None:
        """The choices of every key (GridSampler's space), None if a key is continuous."""
        # lazy: an optional extra (finetune[optuna])
        from optuna.distributions import CategoricalDistribution

        if not all(isinstance(d, CategoricalDistribution) for d in self.distributions.values()):
            return None
        return {k: list(d.choices) for k, d in self.distributions.items()}

    def enqueued(self, entry: dict[str, Any], i: int) -> dict[str, Any]:
        """An enqueue entry in the study's terms (each choice as its written form)."""
        params = {}
        for key, value in entry.items():
            if key not in self.distributions:
                raise FinetuneError(f"hydra.sweeper.enqueue[{i}].{key}: not a key the search "
                                    f"varies ({', '.join(self.distributions) or 'none'}); "
                                    "every other key is the same for all trials")
            if key in self.decoded:
                matches = [c for c, v in zip(self.distributions[key].choices,
                                             self.decoded[key], strict=True) if v == value]
                if not matches:
                    listed = ", ".join(map(str, self.decoded[key]))
                    raise FinetuneError(f"hydra.sweeper.enqueue[{i}].{key}={value!r}: not one "
                                        f"of its choices ({listed})")
                value = matches[0]
            params[key] = value
        return params


def search_space(arguments: list[str]) -> Space:
    """The distributions and fixed overrides of `arguments` (Hydra override grammar)."""
    # lazy: an optional extra (finetune[optuna])
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    space = Space()
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()  # a later override of a key replaces an earlier
        space.distributions.pop(key, None)  # one: the command line's the search's
        space.decoded.pop(key, None)
        fixed.pop(key, None)
        if not override.is_sweep_override():
            fixed[key] = str(override.input_line)
            continue
        value = override.value()
        if isinstance(value, IntervalSweep):
            low, high = value.start, value.end
            log_scale = "log" in value.tags
            if isinstance(low, int) and isinstance(high, int):
                space.distributions[key] = IntDistribution(low, high, log=log_scale)
            else:
                space.distributions[key] = FloatDistribution(float(low), float(high),
                                                             log=log_scale)
            continue
        if isinstance(value, RangeSweep) and not value.shuffle and all(
                isinstance(v, int) for v in (value.start, value.stop, value.step)):
            start, stop, step = int(value.start), int(value.stop), int(value.step)
            last = start + step * ((stop - start - 1) // step)  # range's stop is left out
            space.distributions[key] = IntDistribution(start, last, step=step)
            continue
        encoded = list(override.sweep_string_iterator())
        decoded = list(override.sweep_iterator(transformer=Transformer.identity))
        space.distributions[key] = CategoricalDistribution(encoded)
        space.decoded[key] = decoded
    space.fixed = list(fixed.values())
    return space


def suggest(trial: Any, key: str, distribution: Any) -> Any:
    """Trial's value for `key` through Optuna's public suggest API."""
    # lazy: an optional extra (finetune[optuna])
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high,
                                 step=distribution.step, log=distribution.log)
    return trial.suggest_float(key, distribution.low, distribution.high, log=distribution.log)


class StudySweeper:
    def __init__(self, direction: str = "maximize", n_trials: int = 20, n_jobs: int = 1,
                 sampler: Any = None, enqueue: Any = None, params: Any = None) -> None:
        self.direction = str(getattr(direction, "name", direction)).lower()
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        sampler = OmegaConf.to_container(sampler, resolve=True) \
            if isinstance(sampler, DictConfig) else dict(sampler or {})
        self.sampler_name = str(sampler.get("name", "tpe"))
        self.seed = sampler.get("seed")
        if OmegaConf.is_config(enqueue):
            enqueue = OmegaConf.to_container(enqueue, resolve=True)
        self.enqueue = [dict(e) for e in enqueue or []]
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> list[Any]:
        assert self.config is not None
        cfg = self.config
        problems = studies.sweep_problems(cfg.sweep, cfg.hydra.sweeper)

        direction = sweeper_problem(cfg.hydra, str(cfg.metric))  # before a trial is claimed
        problems += [direction] if direction else []
        if self.n_trials < 1 or self.n_jobs < 1:
            problems.append("hydra.sweeper.n_trials and n_jobs must be 1 or more")
        space = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        try:
            enqueue = [space.enqueued(e, i) for i, e in enumerate(self.enqueue)]
        except FinetuneError as err:
            problems += err.problems
            enqueue = []
        grid = space.grid()
        if self.sampler_name == "grid" and grid is None:
            problems.append("hydra.sweeper.sampler.name=grid needs every searched key as a "
                            "choice (or a,b,c list); an interval has no grid")
        if problems:  # wrong for every trial: said before any job starts
            for line in problems:
                print(f"finetune: error: {line}", file=sys.stderr)
            raise SystemExit(2)
        n_trials = self.n_trials
        if self.sampler_name == "grid" and grid is not None:
            n_trials = min(n_trials, math.prod(len(v) for v in grid.values()))
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        url = studies.storage_url(cfg.sweep.storage, sweep_dir)
        name = cfg.sweep.study_name or studies.DEFAULT_NAME
        try:
            storage = studies.open_storage(url, int(cfg.sweep.heartbeat))
            study, how = studies.open_study(storage, name, self.direction, n_trials, enqueue)
        except FinetuneError as err:
            for line in err.problems:
                print(f"finetune: error: {line}", file=sys.stderr)
            raise SystemExit(2) from None
        found = studies.counts(study)
        print(f"finetune: study {name} ({studies.shown(url)}) {how}: "
              + ", ".join(f"{n} {s}" for s, n in sorted(found.items())), flush=True)
        returns: list[Any] = []
        try:
            while True:
                studies.fail_stale(study)
                numbers = []
                while len(numbers) < self.n_jobs:
                    number = studies.claim(study, storage)
                    if number is None:
                        break
                    numbers.append(number)
                if not numbers:
                    break
                returns += self._run(study, storage, space, grid, numbers, sweep_dir)
        except Exception as err:
            if not is_disk_full(err):
                raise
            print(f"finetune: error: no space left for the study's database "
                  f"({studies.shown(url)}) or the sweep dir {sweep_dir}; the trials told so far "
                  "are kept: free some space and run the same sweep again (it resumes the "
                  "study)", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        finally:
            try:
                studies.write_trials(study, studies.shown(url), sweep_dir)
                studies.write_best(study, sweep_dir)
            except Exception as err:
                if not is_disk_full(err):
                    raise
        found = studies.counts(study)
        print(f"finetune: study {name}: no trial left to claim; "
              + ", ".join(f"{n} {s}" for s, n in sorted(found.items())), flush=True)
        return returns

    def _run(self, study: Any, storage: Any, space: Space, grid: dict[str, list[Any]] | None,
             numbers: list[int], sweep_dir: Path) -> list[Any]:
        """Suggest the claimed trials' values, run them as jobs (the job dir is the trial's
        number), tell the study how each ended."""
        # lazy: an optional extra (finetune[optuna])
        from optuna.trial import TrialState

        overrides, kept = [], []
        for number in numbers:
            study.sampler = studies.make_sampler(self.sampler_name, self.seed, number, grid)
            trial = studies.trial_of(study, storage, number)
            try:
                for key, distribution in space.distributions.items():
                    suggest(trial, key, distribution)  # the fixed value, if enqueued
                outside = space.outside(dict(trial.params))
            except (ValueError, TypeError) as err:  # Optuna refuses a fixed value it cannot
                outside = [f"{key}: {err}"]  # take (a choice not among the choices)
            if outside:  # never passed on to a job's command line
                print(f"finetune: error: trial {number} holds values outside the search "
                      f"({', '.join(outside)}); it fails without running", file=sys.stderr,
                      flush=True)
                study.tell(number, state=TrialState.FAIL)
                continue
            trial.set_user_attr(studies.JOB, {"host": socket.gethostname(), "dir": str(
                (sweep_dir / str(number)).resolve())})  # where it runs, for the others
            overrides.append((*space.overrides(dict(trial.params)), f"sweep.trial={number}"))
            kept.append(number)
        numbers = kept
        if not numbers:
            return []
        ids = [storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), n) for n in numbers]
        returns: list[Any] = []
        try:
            with studies.Heartbeat(storage, ids):
                start = 0
                while start < len(numbers):  # the launcher numbers jobs consecutively
                    end = start + 1
                    while end < len(numbers) and numbers[end] == numbers[end - 1] + 1:
                        end += 1
                    returns += list(self.launcher.launch(overrides[start:end],
                                                         initial_job_idx=numbers[start]))
                    start = end
        except Exception as err:  # the launcher lost the jobs (a worker process died)
            lost = numbers[len(returns):]
            print(f"finetune: error: trial(s) {', '.join(map(str, lost))} failed in the "
                  f"launcher ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
                  "the study goes on", file=sys.stderr, flush=True)
            for number in lost:
                study.tell(number, state=TrialState.FAIL)
            numbers, ids = numbers[:len(returns)], ids[:len(returns)]
        except BaseException:  # Ctrl-C, SIGTERM, a stop before the first job
            for number in numbers[len(returns):]:
                study.tell(number, state=TrialState.FAIL)
            raise
        for number, trial_id, ret in zip(numbers, ids, returns, strict=True):
            try:
                value = float(ret.return_value)
            except Exception:  # the job raised, or returned nothing to rank
                value = math.nan
            if storage.get_trial(trial_id).user_attrs.get(studies.PRUNED) is not None:
                study.tell(number, state=TrialState.PRUNED)
            elif math.isfinite(value):
                study.tell(number, value)
            else:
                study.tell(number, state=TrialState.FAIL)
        return returns
