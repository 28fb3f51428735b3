"""One training run, top to bottom: plan (finetune/training/plan.py) -> fit -> save."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from torch import nn

from finetune import locations
from finetune.compose import prepare
from finetune.compose.precheck import mix_enabled
from finetune.data.mixing import BatchMix
from finetune.errors import FinetuneError
from finetune.rundir import artifacts
from finetune.sweeps.pruning import pruning_callback
from finetune.tasks.table import task_of
from finetune.training import feature_cache as cache
from finetune.training.batch_finder import find_batch_size
from finetune.training.callbacks import (
    EMA,
    AtomicCheckpointIO,
    BestWeights,
    EpochLine,
    SaveOnInterrupt,
    StopEarly,
    Terminated,
    ThroughputMeter,
    progress_bar_on,
    stop_name,
)
from finetune.training.detection_module import DetectorModule
from finetune.training.lightning_module import FinetuneModule, StepOptions
from finetune.training.loggers import LOGGERS
from finetune.training.lr_finder import find_lr
from finetune.training.plan import RunContext, RunPlan, optimizer_groups, plan_run
from finetune.training.quiet import quiet_output
from finetune.training.resume import check_resumable, resume_checkpoint
from finetune.training.save import (
    NonFiniteMetrics,
    log_built,
    parameter_counts,
    print_summary,
    save_extractor,
    save_run,
    write_report,
)
from finetune.training.segmentation_module import SegmenterModule

log = logging.getLogger("finetune")

# the LightningModule of each kind of model a task trains (Task.model_kind)
MODULES: dict[str, type[FinetuneModule]] = {"classifier": FinetuneModule,
                                            "detector": DetectorModule,
                                            "segmenter": SegmenterModule}


def is_main_process() -> bool:
    """Rank zero (the only process, or rank 0 of DDP): the one that writes the run dir."""
    return rank_zero_only.rank == 0


def run(cfg: DictConfig, context: RunContext) -> float:
    """Train as `cfg` says, write the run dir, return the monitored metric (`metric`).

    A run stopped by a user error leaves metrics.json with status "failed" and the message;
    one stopped by Ctrl-C or SIGTERM, status "interrupted". Under DDP every rank runs this;
    only rank zero writes (and holds the run dir's lock: one run writes a dir at a time).
    """
    assert context.run_dir is not None
    lock = artifacts.lock_run_dir(context.run_dir) if context.main_process else None
    try:
        with _sigterm_as_interrupt(), quiet_output(cfg.log_level):
            return _guarded_run(cfg, context)
    finally:
        if lock is not None:
            lock.close()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    """SIGTERM raises Terminated (a KeyboardInterrupt) so that it ends a run as Ctrl-C does:
    Lightning saves checkpoints/interrupted.ckpt through SaveOnInterrupt, the status says
    interrupted and the exit is non-zero. (Lightning's own SIGTERM handling stops at the
    next batch with a SystemExit that exits 0, leaving the status `running`.) Lightning keeps
    this handler and calls it after its own while it fits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guarded_run(cfg: DictConfig, context: RunContext) -> float:
    run_dir = context.run_dir
    assert run_dir is not None
    if is_main_process():
        artifacts.write_json(run_dir / artifacts.METRICS, {"status": "running"})
    try:
        return _run(cfg, context)
    except NonFiniteMetrics:
        raise  # metrics.json already says so, with every metric
    except FinetuneError as err:
        if is_main_process():
            if context.sweep_dir is None and artifacts.remove_if_unused(run_dir):
                raise  # refused before anything ran: no run dir left behind (a sweep keeps
                # its failed jobs' dirs: the leaderboard lists them)
            with contextlib.suppress(artifacts.DiskFull):  # the disk may be what failed
                artifacts.write_json(run_dir / artifacts.METRICS,
                                     {"status": "failed", "error": err.problems})
        raise
    except KeyboardInterrupt as err:  # before or after fit; in fit, SaveOnInterrupt wrote it
        if is_main_process():
            artifacts.write_json(run_dir / artifacts.METRICS, {
                "status": "interrupted",
                "error": [f"stopped by {stop_name(err)} before training began or after it "
                          "ended; run the command again"]})
        raise
    except Exception as err:
        # Not a user error: the traceback goes beside the run for whoever debugs it.
        if is_main_process():
            artifacts.write_bytes(run_dir / artifacts.ERROR_FILE, traceback.format_exc().encode())
            artifacts.write_json(run_dir / artifacts.METRICS, {
                "status": "failed", "error": [f"{type(err).__name__}: {err}"],
                "traceback": artifacts.ERROR_FILE})
        raise


def _run(cfg: DictConfig, context: RunContext) -> float:
    """plan -> fit -> save."""
    run_dir, recipe = context.run_dir, context.recipe
    assert run_dir is not None
    log.info("compose: recipe %s -> %s", recipe.get("name"), run_dir)
    plan = plan_run(cfg, context)
    plan.raise_problems()
    built, freeze, data, prep = plan.built, plan.freeze, plan.data, plan.prep
    assert built is not None and freeze is not None and prep is not None
    if cfg.head.type == "none":
        if not is_main_process():
            return float("nan")
        return save_extractor(run_dir, cfg, context, built, prep)
    assert data is not None
    num_classes = len(data.class_names)
    if data.bad_images and is_main_process():
        artifacts.write_csv(run_dir / artifacts.BAD_IMAGES, ["path", "reason"],
                            [list(b) for b in data.bad_images])
        log.warning("data: skipped %d images that cannot be decoded (listed in %s), e.g. %s",
                    len(data.bad_images), run_dir / artifacts.BAD_IMAGES, data.bad_images[0][0])
    log.info("data: %s, %d classes, %d train / %d val images, %s", cfg.data.name, num_classes,
             len(data.train_set), len(data.val_set), prep.to_dict())
    log_built(cfg, built)
    data.decode_images(features_cached=plan.cache_cut is not None)
    if data.decode_info is not None:
        log.info("data: decoded-image cache %s", data.decode_info["reason"])
    if is_main_process():
        artifacts.write_json(run_dir / artifacts.LOAD_REPORT, built.report.to_dict())
    task = task_of(cfg)

    def make_module() -> FinetuneModule:
        return MODULES[task.model_kind](
            built.model, num_classes, freeze, cfg.optim, cfg.sched, task=task,
            options=StepOptions(cfg.loss.label_smoothing, cfg.loss.aux_weight, cfg.seed,
                                cfg.model.channels_last, cfg.model.compile),
            groups=plan.groups, class_weights=plan.class_weights,
            mix=batch_mix(cfg, num_classes))

    found: dict[str, Any] = {}
    if plan.batch_auto:  # the batch first: the rate is found at it
        found["batch_size_finder"] = find_batch_size(cfg, data, run_dir, make_module)
    if plan.lr_auto:  # then the rate; then every group again from it
        found["lr_finder"] = find_lr(cfg, data, run_dir, make_module)
        plan.groups = optimizer_groups(cfg, built.model, freeze, built.adapter)
    log.info("plan: train from %s; %s", freeze.train_from or "the first layer",
             trainable_summary(built.model))
    if freeze.eval_modules:
        log.info("plan: %d frozen BatchNorm layers stay in eval mode on purpose (their running "
                 "statistics are pretrained; freeze.bn=%s; freeze.bn=train updates them)",
                 len(freeze.eval_modules), cfg.freeze.bn)
    if is_main_process():  # what a report of a sweep still running can show
        artifacts.write_json(run_dir / artifacts.METRICS, {
            "status": "running", "train_from": freeze.train_from, "lr": float(cfg.optim.lr),
            "metric": cfg.metric, **parameter_counts(built.model)})
    for stage in freeze.stages[1:]:
        log.info("plan: at epoch %d, %s unfreezes (%d parameter tensors, group %s)",
                 stage.epoch, stage.selector, len(stage.params), stage.name)
    module = make_module()
    checkpoint = resume_checkpoint(cfg.resume, run_dir)
    history = (check_resumable(checkpoint, module, cfg.trainer.max_epochs,
                               ema=cfg.model.ema.decay is not None)
               if checkpoint is not None else ([], []))
    if checkpoint is not None and checkpoint.parent.parent.resolve() != run_dir.resolve() \
            and best_epochs_kept(checkpoints_kept(cfg.checkpoint.keep,
                                                  context.sweep_dir is not None)):
        log.info("resume: the best checkpoints kept here rank the epochs trained in this run "
                 "dir; those of the earlier epochs stay in %s", checkpoint.parent)
    features = feature_cache(cfg, plan)
    pruning = pruning_callback(cfg, context.sweep_dir, run_dir)  # a study's trial
    trainer, meter = make_trainer(cfg, run_dir, history, features, context.launched,
                                  sweep=context.sweep_dir is not None,
                                  best_weights=data.test_set is not None
                                  and cfg.eval.checkpoint == "best",
                                  extra=[pruning] if pruning is not None else [])
    try:
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint, weights_only=True)
    except RuntimeError as err:
        friendly = input_too_small(err, cfg)
        if friendly is None:
            raise
        raise friendly from None
    if not trainer.is_global_zero:
        return float(trainer.callback_metrics.get(cfg.metric, float("nan")))
    kept = run_dir / artifacts.CHECKPOINTS
    for ranked in sorted(kept.glob("best.ckpt")) + sorted(kept.glob("top-epoch*.ckpt")):
        artifacts.link_if_identical(ranked, kept / artifacts.LAST_CHECKPOINT)
    metrics = save_run(run_dir, cfg, context, built, freeze, data, prep, module, trainer, meter,
                       cache_info(features), plan.groups, found)
    if cfg.eval.report:
        write_report(run_dir)
    for logger in trainer.loggers[1:]:  # the chosen logger's, after the CSV one
        LOGGERS[cfg.logger.name].finish(logger, metrics)
    print_summary(run_dir, metrics)
    value = metrics.get(cfg.metric)
    return float(value) if value is not None else float("nan")


def batch_mix(cfg: DictConfig, num_classes: int) -> BatchMix | None:
    """data.mix as the module's batch transform (None: off)."""
    if not mix_enabled(cfg.data):
        return None
    mix = BatchMix(num_classes, cfg.data.mix.mixup_alpha, cfg.data.mix.cutmix_alpha,
                   cfg.data.mix.prob)
    log.info("data: %s on %.0f%% of the training batches, soft targets",
             " or ".join(mix.describe()["mixes"]), 100 * cfg.data.mix.prob)
    return mix


def feature_cache(cfg: DictConfig, plan: RunPlan) -> cache.FeatureCache | str:
    """The feature cache callback for this run, or why there is none (`freeze.cache`)."""
    if plan.cache_cut is None:
        log.info("feature cache: %s", plan.cache_reason)
        return plan.cache_reason
    directory = cfg.freeze.cache_dir
    if directory is None and plan.context.sweep_dir is not None:
        directory = plan.context.sweep_dir / "feature_cache"
    return cache.FeatureCache(plan.cache_cut, Path(directory).expanduser() if directory
                              else None, write=is_main_process())


def cache_info(features: cache.FeatureCache | str) -> dict[str, Any]:
    if isinstance(features, str):
        return {"status": "off", "reason": features}
    return features.info


def input_too_small(err: RuntimeError, cfg: DictConfig) -> FinetuneError | None:
    """A shape error from pooling/conv on inputs smaller than the network can take."""
    text = str(err)
    if "Output size is too small" not in text and "Kernel size can't be greater" not in text:
        return None
    hint = (" (inception_v3's auxiliary head needs about 299 px: or set "
            "model.kwargs.aux_logits=false)" if cfg.model.name == "inception_v3" else "")
    return FinetuneError(f"{cfg.model.name} cannot take {cfg.data.image_size} px inputs "
                         f"({text.splitlines()[0]}); raise data.image_size{hint}")


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.1f}%)"


def make_loggers(name: str, run_dir: Path) -> list[Logger]:
    """metrics.csv always; the chosen logger's beside it (finetune/training/loggers.py; validate
    checked that its package is installed)."""
    return [CSVLogger(save_dir=run_dir, name="", version=""), *LOGGERS[name].make(run_dir)]


def checkpoints_kept(keep: str, sweep: bool) -> str:
    """checkpoint.keep resolved: auto is last for a run (to resume from) and none for a
    sweep job, whose weights are its model.safetensors."""
    return ("none" if sweep else "last") if keep == "auto" else keep


def best_epochs_kept(keep: str) -> int:
    """How many of the best epochs checkpoints/ keeps: best and both keep one (best.ckpt),
    topK keeps K (top-epochE.ckpt, with last.ckpt to resume from), the others none."""
    if keep.startswith("top"):
        return int(keep.removeprefix("top"))
    return 1 if keep in ("best", "both") else 0


def checkpoint_monitor(metric: str) -> tuple[str, str]:
    """The logged value that ranks checkpoints, and its direction: the run's `metric` (best/val/acc
    ranks by val/acc; a loss is lower-is-better)."""
    logged = metric.removeprefix("best/")
    return logged, "min" if logged.endswith("loss") else "max"


def make_trainer(cfg: DictConfig, run_dir: Path,
                 history: tuple[list[str], list[list[str]]] = ([], []),
                 features: cache.FeatureCache | str | None = None,
                 launched: float | None = None, sweep: bool = False,
                 best_weights: bool = False, extra: list[pl.Callback] | None = None
                 ) -> tuple[pl.Trainer, ThroughputMeter]:
    """The Lightning Trainer with our checkpoints, loggers and meter. `history`: a resumed
    run's earlier metrics (header, rows), which metrics.csv starts with; `features`: the
    feature cache callback, when the run caches; `launched`: when the command started."""
    meter = ThroughputMeter(launched)
    keep = checkpoints_kept(cfg.checkpoint.keep, sweep)
    ranked = best_epochs_kept(keep)
    monitor, mode = checkpoint_monitor(cfg.metric)
    bar = progress_bar_on(cfg.trainer.enable_progress_bar)
    callbacks = [
        # best.ckpt / top-epochE.ckpt hold weights only: a resume continues from last.ckpt
        *([ModelCheckpoint(dirpath=run_dir / artifacts.CHECKPOINTS,
                           filename="best" if ranked == 1 else "top-epoch{epoch}",
                           monitor=monitor, mode=mode, save_top_k=ranked,
                           auto_insert_metric_name=False, enable_version_counter=False,
                           save_weights_only=True)]
          if ranked else []),
        # Lightning 2.6's save_last only refreshes last.ckpt when a top-k save happened in the
        # same step; a monitor-less checkpoint keeps it truly the last.
        *([ModelCheckpoint(dirpath=run_dir / artifacts.CHECKPOINTS, filename="last",
                           monitor=None, save_top_k=1, enable_version_counter=False,
                           save_weights_only=not cfg.checkpoint.optimizer)]
          if keep in ("last", "both") or ranked > 1 else []),
        meter,  # before the cache: computing the features counts as training time
        SaveOnInterrupt(run_dir, lambda message, path: artifacts.write_json(
            run_dir / artifacts.METRICS, {"status": "interrupted", "error": [message],
                                          "checkpoint": path})),
        *([features] if isinstance(features, cache.FeatureCache) else []),
        *([] if bar else [EpochLine()]),
    ]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    if cfg.model.ema.decay is not None:
        callbacks.append(EMA(cfg.model.ema.decay, cfg.model.ema.start_epoch))
    if best_weights:
        callbacks.append(BestWeights(cfg.metric))
    callbacks += extra or []
    stopping = trainer_kwargs.pop("early_stopping")
    trainer_kwargs.pop("peak_tflops")  # the MFU's (finetune/training/flops.py)
    if stopping["patience"] is not None:
        callbacks.append(StopEarly(stopping["monitor"], stopping["patience"], stopping["mode"],
                                   stopping["min_delta"]))
    loggers = make_loggers(cfg.logger.name, run_dir)
    header, rows = history
    if header and is_main_process():
        writer = loggers[0].experiment  # created now: it deletes an old metrics.csv
        artifacts.write_csv(run_dir / artifacts.METRICS_CSV, header, rows)
        # Known columns: the writer appends to the carried file instead of rewriting it with
        # only the columns it has seen (which would fail on the older rows).
        writer.metrics_keys = list(header)
    # Our samplers shard for DDP themselves (the shuffling order and augmentation seeds per
    # epoch; validation split across ranks), so Lightning must not replace them.
    # Lightning's model summary: its FLOPs column is 0 for these models and the plan lines say
    # what trains; log_level=debug shows it.
    trainer_kwargs.setdefault("enable_model_summary", cfg.log_level == "debug")
    trainer_kwargs["enable_progress_bar"] = bar
    trainer_kwargs["enable_checkpointing"] = keep != "none"  # else Lightning adds its own
    trainer = pl.Trainer(default_root_dir=run_dir, logger=loggers, callbacks=callbacks,
                         use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
                         **trainer_kwargs)
    log.info("trainer: %s, %d device(s), %d process(es), precision %s, %d CPU thread(s) (%s)",
             trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower(),
             trainer.num_devices, trainer.world_size, trainer.precision,
             torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    return trainer, meter


@dataclass
class RunResult:
    """What `finetune.train` returns: the run dir, its metrics.json, the monitored metric."""

    run_dir: Path
    metrics: dict[str, Any]
    value: float


def train_in_process(recipe: str | Path = "base", overrides: Sequence[str] = (),
                     run_dir: str | Path | None = None) -> RunResult:
    """One run in this process, exactly as `python -m finetune recipe=RECIPE OVERRIDES...`
    runs it (the same gate, the same composition through Hydra's compose API), but without
    Hydra's logging set-up or its process-level globals; one device (DDP needs the CLI).

    Raises:
        FinetuneError: the problems that stopped the run (metrics.json records them too).
    """

    launched = time.time()

    extra = [f"hydra.run.dir={Path(run_dir).expanduser().resolve()}"] if run_dir else []
    args = prepare.prepare([f"recipe={recipe}", *overrides, *extra])
    # as Hydra records a command line's task overrides (recipe= among them, hydra.* apart)
    overrides_given = [a for a in args if not a.startswith("hydra.")]
    with initialize_config_dir(str(locations.CONF_DIR), version_base="1.3", job_name="finetune"):
        full = compose("config", overrides=args, return_hydra_config=True)
    directory = Path(str(full.hydra.run.dir)).expanduser().resolve()
    name = str(full.hydra.runtime.choices.recipe)
    cfg = full.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    directory.mkdir(parents=True, exist_ok=True)
    artifacts.write_bytes(directory / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    artifacts.write_bytes(directory / ".hydra" / "overrides.yaml",
                          OmegaConf.to_yaml(overrides_given).encode())
    # as hydra.main records it (a rerun of a run that stopped reads its recipe choice here)
    artifacts.write_bytes(directory / ".hydra" / "hydra.yaml", OmegaConf.to_yaml(
        OmegaConf.create({"hydra": OmegaConf.to_container(full.hydra, resolve=False)}))
        .encode())
    context = RunContext(run_dir=directory, recipe=prepare.recipe_record(
        name, prepare.RECIPE_FILES, prepare.RERUN_OF), overrides=overrides_given, launched=launched)
    value = run(cfg, context)
    return RunResult(directory, artifacts.read_json(directory / artifacts.METRICS), value)


