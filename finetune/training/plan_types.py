"""The plan's types: what a run knows beyond its config (RunContext), the model as built
(Built), and the run before it trains (RunPlan) — shared by the plan of each kind of model
(finetune/training/plan.py, finetune/training/detection_plan.py) and what reads a plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn
from torchvision.models import WeightsEnum

from finetune.data.datamodule import ImageDataModule
from finetune.errors import ConfigError
from finetune.models import backbones
from finetune.models.adapters import AdapterPlan
from finetune.training import feature_cache as cache
from finetune.training.freezing import FreezePlan
from finetune.training.optim import GroupPlan
from finetune.weights.load_report import LoadReport


@dataclass
class RunContext:
    """What a run needs to know beyond its config, which Hydra's globals used to carry.

    Attributes:
        run_dir: where the run writes (None: nothing is written, as for inspect).
        sweep_dir: the sweep this run is a job of, if any (its feature cache lives there).
        recipe: name, file, sha256 (and rerun_of) of the recipe, for the manifest.
        overrides: the command line's overrides, for the manifest.
        main_process: rank zero (the only process, or rank 0 of DDP): the one that writes.
        launched: wall-clock time the command (or the finetune.train call) started, for
            first_step_seconds; None: not measured.
    """

    run_dir: Path | None = None
    sweep_dir: Path | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    main_process: bool = True
    launched: float | None = None


@dataclass
class Built:
    """The model as built, and how: builder arguments, head paths, the weight load, the
    output shape of one image in a dry forward, and its adapters."""

    model: nn.Module
    build_kwargs: dict[str, Any]
    head_paths: list[str]
    report: LoadReport
    output_shape: list[int]
    adapter: AdapterPlan | None = None  # adapter.type: the adapters in `model`
    base_sha256: str | None = None  # the base weights the adapters apply to


@dataclass
class RunPlan:
    """The run before it trains: data, model, weights, freeze plan, optimizer groups, cache
    decision; or why it
    cannot run (`problems`, every one found)."""

    cfg: DictConfig
    context: RunContext
    entry: WeightsEnum | dict[str, Any] | None = None  # torchvision's, or timm's config
    prep: backbones.Preprocessing | None = None
    data: ImageDataModule | None = None  # (a BoxDataModule is one)
    class_names: list[str] | None = None
    built: Built | None = None
    freeze: FreezePlan | None = None
    groups: list[GroupPlan] = field(default_factory=list)  # every stage's, in join order
    cache_cut: cache.Cut | None = None
    cache_reason: str = "off: nothing trains"
    class_weights: list[float] | None = None  # loss.class_weights, resolved
    lr_auto: bool = False  # optim.lr=auto: planned at a placeholder until the finder runs
    batch_auto: bool = False  # data.batch_size=auto: likewise, until the batch-size finder
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def raise_problems(self) -> None:
        """Stop here with every problem found, one line each."""
        if self.problems:
            raise ConfigError(list(dict.fromkeys(self.problems)))
