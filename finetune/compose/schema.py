"""Typed schema of every config group, recipe lookup, and compose-time checks.

Nothing here imports torch: `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import did_you_mean
from finetune.extensions import TABLES
from finetune.sweeps.study import PRUNERS
from finetune.tasks.detection import MAP_METRICS as DETECTION_METRICS
from finetune.tasks.instances import MASK_MAP_METRICS
from finetune.tasks.segmentation import MASK_METRICS


@dataclass
class EmaConfig:
    decay: float | None = None  # None: off
    start_epoch: int = 0


@dataclass
class DetectorConfig:
    # task=detection on a classifier: fasterrcnn | retinanet | fcos; instance masks: maskrcnn
    head: str = "fasterrcnn"
    levels: list[str] = field(default_factory=list)  # FPN levels by node; []: one map
    kwargs: dict[str, Any] = field(default_factory=dict)  # to the detector (min_size, ...)
    # auto | true | false: the backbone's BatchNorm as FrozenBatchNorm2d (auto: as
    # torchvision builds its pretrained detectors; finetune/training/detection_plan.py)
    frozen_bn: Any = "auto"


@dataclass
class SegmenterConfig:
    head: str = "deeplabv3"  # task=segmentation on a classifier: deeplabv3 | fcn
    node: str = "auto"  # the classifier's top-level module whose map the head reads; auto


@dataclass
class ModelConfig:
    source: str = "torchvision"
    name: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    compile: bool = False
    ema: EmaConfig = field(default_factory=EmaConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)


@dataclass
class WeightsConfig:
    source: str = "none"
    name: str = "DEFAULT"
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    recipe: str | None = None
    recipe_overrides: list[str] = field(default_factory=list)
    repo: str | None = None  # hf_hub: org/name
    revision: str | None = None  # timm / hf_hub: a branch, tag or commit (null: main)
    file: str | None = None  # hf_hub: the weights file in the repo (null: model.safetensors)
    strip_prefix: str = "auto"
    rename: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    require: list[str] = field(default_factory=list)
    on_shape_mismatch: str = "skip"
    min_loaded: float = 0.5


@dataclass
class HeadConfig:
    type: str = "classifier"
    num_classes: int | None = None
    dropout: float = 0.0
    hidden: list[int] = field(default_factory=list)


@dataclass
class PhaseConfig:
    """One entry of freeze.unfreeze."""

    epoch: int = MISSING
    train_from: Any = None
    modules: Any = None
    name: str | None = None
    lr: float | None = None
    lr_mult: float | None = None
    warmup_epochs: int = 0


@dataclass
class FreezeConfig:
    train_from: Any = None
    modules: list[Any] = field(default_factory=list)
    bn: str = "frozen"
    unfreeze: list[PhaseConfig] = field(default_factory=list)
    cache: Any = "auto"  # auto | true | false (YAML may give a bool)
    cache_dir: str | None = None


@dataclass
class GroupConfig:
    """One entry of optim.groups."""

    modules: Any = MISSING
    name: str | None = None
    lr: float | None = None
    lr_mult: float | None = None
    weight_decay: float | None = None


@dataclass
class AdapterOverrideConfig:
    """One entry of adapter.overrides."""

    modules: Any = MISSING
    rank: int | None = None
    alpha: float | None = None


@dataclass
class AdapterConfig:
    """LoRA / DoRA adapters (finetune/models/adapters.py); type null: none."""

    type: str | None = None  # lora | dora
    modules: Any = field(default_factory=list)  # selectors of the Linear / Conv2d layers
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    overrides: list[AdapterOverrideConfig] = field(default_factory=list)
    train_fully: Any = field(default_factory=list)  # selectors trained fully (the head always)
    lr: float | None = None  # the adapter parameters' lr; null: optim.lr


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: Any = 1.0e-3  # > 0, or auto (finetune/training/lr_finder.py)
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    alpha: float = 0.99
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm"])
    groups: list[GroupConfig] = field(default_factory=list)
    layer_decay: float | None = None


@dataclass
class SchedConfig:
    name: str = "cosine"
    epochs: int | None = None
    warmup_epochs: int = 0
    step_size: int = 10
    gamma: float = 0.1
    patience: int = 2


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    class_weights: Any = None  # null | auto | a weight per class
    pos_weight: Any = None  # task=multilabel: null | auto | a weight per label
    aux_weight: float = 0.4


@dataclass
class MixConfig:
    mixup_alpha: float = 0.0  # 0: off
    cutmix_alpha: float = 0.0  # 0: off
    prob: float = 1.0  # of a batch being mixed


@dataclass
class CanvasConfig:
    count: int = 240  # data=digit_canvases: canvases generated (val_fraction of them validate)
    size: int = 96  # their side in px
    per_canvas: int = 3  # at most this many digits on one (at least one)
    scales: list[int] = field(default_factory=lambda: [3, 4])  # a digit's 8 px times one


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    classes: list[Any] | None = None
    image_size: int | None = None
    batch_size: Any = 32  # images per step, or auto (training/batch_finder.py)
    val_fraction: float = 0.2
    test_fraction: float | None = None  # a stratified test split held out first (null: none)
    folds: int | None = None  # k-fold cross-validation: K folds (null: one val_fraction split)
    fold: int = 0  # which fold is the validation set, 0..K-1
    num_workers: Any = "auto"
    train_size: int | None = None
    channels: int = 3
    interpolation: str | None = None  # null: the weights' (timm's bicubic, torchvision's)
    crop_pct: float | None = None  # null: the weights' crop / resize ratio
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: list[Any] = field(default_factory=list)
    fake_size: int = 256
    fake_classes: int = 10
    on_bad_image: str = "skip"
    follow_links: bool = False  # images outside data.root (links, ../ paths): command line only
    max_image_pixels: int = 89_478_485
    decode_cache: Any = "auto"  # auto | true | false: image files decoded once (decoded.py)
    uint8_batches: Any = "auto"  # auto | true | false: normalized on the device (datamodule)
    sampler: str = "shuffle"
    mix: MixConfig = field(default_factory=MixConfig)
    limit_per_class: dict[Any, Any] = field(default_factory=dict)  # class -> at most N images
    box_format: str = "xyxy"  # data=box_csv: the four numbers' meaning
    empty_images: str = "keep"  # task=detection: images without boxes (negatives) or refuse
    canvases: CanvasConfig = field(default_factory=CanvasConfig)
    ignore_index: int = 255  # task=segmentation: the mask value that marks unlabelled pixels


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val/loss"
    patience: int | None = None  # None: off
    mode: str = "auto"
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "auto"
    devices: Any = "auto"
    precision: str = "32-true"
    strategy: str = "auto"
    num_nodes: int = 1
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    deterministic: Any = False
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    peak_tflops: float | None = None  # the device's peak for the MFU; null: the table's


@dataclass
class LoggerConfig:
    name: str = "csv"


@dataclass
class CheckpointConfig:
    keep: str = "auto"
    optimizer: bool = True


@dataclass
class EvalConfig:
    checkpoint: str = "last"  # weights the test split evaluates: last (model.safetensors) | best
    report: bool = True  # write report.html at the end of the run


@dataclass
class PrunerConfig:
    name: str = "none"  # none | median | halving (finetune/sweeps/study.py PRUNERS)
    warmup_epochs: int = 1  # median: epochs every trial runs before it can be pruned
    startup_trials: int = 2  # median: trials that finish before any is pruned
    min_epochs: int = 1  # halving: epochs before the first rung
    reduction_factor: int = 3  # halving: 1 in this many trials goes on at each rung


@dataclass
class SweepConfig:
    """The shared Optuna study of `sweep=optuna` (finetune/sweeps/study.py)."""

    storage: str | None = None  # null: SQLite in the sweep dir; an SQLAlchemy URL
    study_name: str | None = None  # null: "finetune" (the sweep dir's own study)
    heartbeat: int = 30  # seconds between a running trial's heartbeats
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    trial: int | None = None  # the trial a job runs: set by the sweeper, never by a recipe


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    surgery: list[Any] = field(default_factory=list)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    resume: str | None = None
    metric: str = "val/acc"
    log_level: str = "info"
    task: str = "multiclass"


# Keys whose value names an entry of an extension table (finetune/extensions.py): adding an
# entry adds the choice. Each table module makes its table and registers it in TABLES;
# finetune.plugins.load() imports them all (and the installed plugins) before a choice is checked.
TABLE_KEYS = ("weights.source", "model.source", "data.name", "sched.name", "freeze.bn",
              "logger.name", "task")

# Keys whose value is one of a closed set; checked at compose time with nearest matches.
CLASS_METRICS = ("val/acc", "val/loss", "val/f1", "val/acc_top5")
CHOICES: dict[str, tuple[str, ...]] = {
    "head.type": ("classifier", "none"),
    "adapter.type": (None, "lora", "dora"),  # finetune/models/adapters.py ADAPTER_TYPES
    "data.channels": (1, 3),
    "data.interpolation": (None, "nearest", "bilinear", "bicubic", "lanczos"),
    "weights.on_shape_mismatch": ("skip", "error"),
    "optim.name": ("sgd", "adam", "adamw", "rmsprop"),  # finetune/registry.py OPTIMIZERS
    "data.on_bad_image": ("skip", "error"),
    "data.sampler": ("shuffle", "balanced"),
    "log_level": ("info", "debug"),
    "checkpoint.keep": ("auto", "last", "best", "both", "none",
                        *(f"top{k}" for k in range(2, 11))),
    "metric": (*CLASS_METRICS, "best/val/acc", "val/mAP", *DETECTION_METRICS, *MASK_METRICS,
               *MASK_MAP_METRICS[:4]),
    "eval.checkpoint": ("last", "best"),
    "sweep.pruner.name": PRUNERS,  # finetune/sweeps/study.py
    "trainer.early_stopping.monitor": (*CLASS_METRICS, *DETECTION_METRICS, *MASK_METRICS,
                                       *MASK_MAP_METRICS[:4]),
    # finetune/models/detectors.py HEADS
    "model.detector.head": ("fasterrcnn", "retinanet", "fcos", "maskrcnn"),
    "model.detector.frozen_bn": ("auto", True, False),
    "model.segmenter.head": ("deeplabv3", "fcn"),  # finetune/models/segmenters.py HEADS
    "data.box_format": ("xyxy", "xywh", "cxcywh"),  # finetune/data/boxes.py BOX_FORMATS
    "data.empty_images": ("keep", "refuse"),  # finetune/data/box_checks.py EMPTY_POLICIES
    "trainer.early_stopping.mode": ("auto", "min", "max"),
}


def choices_of(path: str) -> tuple[Any, ...] | None:
    """The values `path` may take, read from its table now (None: any value of its type)."""
    if path in TABLE_KEYS:
        if path not in TABLES:  # a programming error: the caller skipped finetune.plugins.load
            raise RuntimeError(f"the table of {path} is not loaded; call "
                               "finetune.plugins.load() before checking a choice")
        return tuple(TABLES[path])
    return CHOICES.get(path)


# Config groups a user selects with `group=option` (files under conf/<group>/).
GROUPS = ("data", "logger", "sweep")
SCHEMA_NAME = "finetune_schema"
BASE_RECIPE = "base"


def run_suffix() -> str:
    """Four hex digits that tell apart run dirs started in the same second (`${run_suffix:}`
    in hydra.run.dir; cached, so one process and its sweep jobs see one value)."""
    return secrets.token_hex(2)


if not OmegaConf.has_resolver("run_suffix"):
    OmegaConf.register_new_resolver("run_suffix", run_suffix, use_cache=True)


def register_schema() -> None:
    """Store the top-level schema that conf/config.yaml extends."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def register_base_recipe() -> None:
    """`recipe=base` (the default): conf/config.yaml alone, with no recipe on top."""
    ConfigStore.instance().store(group="recipe", name=BASE_RECIPE, node={}, package="_global_")


# ---------------------------------------------------------------------------------------
# Compose-time checks: every problem in the recipe and the overrides, one line each.


def _schema_at(path: str) -> Any:
    """The schema object at dotted `path` (a dataclass instance or a default value), or MISSING."""
    node: Any = Config()
    for part in path.split("."):
        if not is_dataclass(node) or part not in {f.name for f in fields(node)}:
            return MISSING
        node = getattr(node, part)
    return node


def check_key(path: str, where: str) -> str | None:
    """None when `path` is a schema key (or inside a free-form dict), else one message."""
    parts = path.split(".")
    node: Any = Config()
    for depth, part in enumerate(parts):
        if not is_dataclass(node):
            return None  # inside a free-form mapping such as model.kwargs
        names = [f.name for f in fields(node)]
        if part not in names:
            prefix = ".".join(parts[:depth])
            scope = f"in '{prefix}'" if prefix else "at the top level"
            return (f"{where}: unknown key '{path}'{did_you_mean(part, names)}; valid keys "
                    f"{scope}: {', '.join(names)}")
        node = getattr(node, part)
    return None


# Keys typed Any in the schema because they take a whole number or `auto`: checked here.
NUMBER_OR_AUTO = {"data.batch_size": "a whole number of images per step, e.g. 64, or auto "
                                     "(the largest that fits the GPU)"}


def check_value(path: str, value: Any, where: str, probe: Any = None) -> str | None:
    """None when `value` fits the type and choices of `path`, else one message. `probe`: a
    structured Config to try the value on (made once per batch of checks: it is slow)."""
    if path in NUMBER_OR_AUTO and not (isinstance(value, int) and not isinstance(value, bool)) \
            and not (isinstance(value, str) and value.strip().lower() == "auto"):
        return f"{where}: {path}={value!r} has the wrong type (give {NUMBER_OR_AUTO[path]})"
    options = choices_of(path)
    if options is not None and value not in options:
        return (f"{where}: {path}={value!r} is not one of {', '.join(map(str, options))}"
                f"{did_you_mean(value, options)}")
    probe = probe if probe is not None else OmegaConf.structured(Config)
    try:
        OmegaConf.update(probe, path, value, merge=True)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        return f"{where}: {path}={value!r} has the wrong type ({reason})"
    return None


def flatten(node: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, leaf value) pairs; lists and free-form dicts count as leaves."""
    out: list[tuple[str, Any]] = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and is_dataclass(_schema_at(path)):
            out += flatten(value, f"{path}.")
        else:
            out.append((path, value))
    return out


_PROBE: list[Any] = []  # the first structured Config made: later probes are its copies


def new_probe() -> Any:
    """A structured Config to try values on (check_value): slow to make from the dataclasses
    (a sweep's jobs each check a recipe and a manifest), so made once and copied (6x faster)."""
    if not _PROBE:
        _PROBE.append(OmegaConf.structured(Config))
    return copy.deepcopy(_PROBE[0])


def nest(key: str, value: Any) -> dict[str, Any]:
    """`a.b=v` as {a: {b: v}}: the shape import checks walk."""
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


def mix_enabled(data: Any) -> bool:
    """Whether `data.mix` mixes anything (finetune/data/mixing.py does it)."""
    mix = data.get("mix") if data is not None else None
    return bool(mix) and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0) and mix.prob > 0
