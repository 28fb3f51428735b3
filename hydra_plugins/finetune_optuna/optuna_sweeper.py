"""`hydra/sweeper=finetune_optuna` (what `sweep=optuna` picks): the config Hydra composes and
the Sweeper class it instantiates. Imports neither Optuna nor torch (Hydra imports every
plugin module at start-up, for every command; and it runs this module outside sys.modules,
where postponed annotations cannot be resolved: none here.)"""


from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid (grid: every combination of choice() values)
    seed: Any = None  # each trial's sampler is seeded by (seed, trial number)


@dataclass
class FinetuneOptunaSweeperConf:
    _target_: str = "hydra_plugins.finetune_optuna.optuna_sweeper.FinetuneOptunaSweeper"
    direction: str = "maximize"  # maximize | minimize: the way `metric` improves
    n_trials: int = 20  # trials in the study, across every process that works on it
    n_jobs: int = 1  # trials this process runs at once (through a parallel launcher)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    enqueue: list[Any] = field(default_factory=list)  # trials to run first: [{key: value}]
    params: dict[str, str] = field(default_factory=dict)  # key: choice(..) | interval(..) | value


ConfigStore.instance().store(group="hydra/sweeper", name="finetune_optuna",
                             node=FinetuneOptunaSweeperConf, provider="finetune")


class FinetuneOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from finetune.sweeps.optuna_sweeper import StudySweeper

        self.sweeper = StudySweeper(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function,
                           config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
