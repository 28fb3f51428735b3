"""One training run, top to bottom: plan (finetune/plan.py) -> fit -> save."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
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
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from torch import nn

from finetune import artifacts, backbones, cache, plots
from finetune.callbacks import (
    EMA,
    AtomicCheckpointIO,
    BestWeights,
    SaveOnInterrupt,
    StopEarly,
    Terminated,
    ThroughputMeter,
    stop_name,
)
from finetune.data import ImageDataModule
from finetune.errors import FinetuneError
from finetune.freezing import FreezePlan
from finetune.loggers import LOGGERS
from finetune.manifest import Manifest
from finetune.mixing import BatchMix
from finetune.model_sources import model_source_of
from finetune.module import FinetuneModule
from finetune.plan import Built, RunContext, RunPlan, plan_run
from finetune.precheck import mix_enabled
from finetune.pruning import PruneTrial, pruning_callback
from finetune.quiet import quiet_output
from finetune.weight_sources import source_of

log = logging.getLogger("finetune")
MONITOR = "val/acc"


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
    if is_main_process():
        artifacts.write_json(run_dir / artifacts.LOAD_REPORT, built.report.to_dict())
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
    module = FinetuneModule(built.model, num_classes, freeze, cfg.optim, cfg.sched,
                            cfg.loss.label_smoothing, cfg.loss.aux_weight, cfg.seed,
                            cfg.model.channels_last, cfg.model.compile, plan.groups,
                            plan.class_weights, batch_mix(cfg, num_classes),
                            cfg.task == "multilabel")
    checkpoint = resume_checkpoint(cfg.resume, run_dir)
    history = (check_resumable(checkpoint, module, cfg.trainer.max_epochs,
                               ema=cfg.model.ema.decay is not None)
               if checkpoint is not None else ([], []))
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
    artifacts.link_if_identical(run_dir / artifacts.CHECKPOINTS / "best.ckpt",
                                run_dir / artifacts.CHECKPOINTS / artifacts.LAST_CHECKPOINT)
    metrics = save_run(run_dir, cfg, context, built, freeze, data, prep, module, trainer, meter,
                       cache_info(features), plan.groups)
    if cfg.eval.report:
        write_report(run_dir)
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


def resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """`resume`: null; auto (this run dir's last.ckpt, when there is one); a .ckpt file; or
    a run dir (its checkpoints/last.ckpt)."""
    if resume is None:
        return None
    if resume == "auto":
        found = run_dir / artifacts.CHECKPOINTS / artifacts.LAST_CHECKPOINT
        if found.is_file():
            return found
        log.info("resume=auto: no checkpoint in %s yet; starting from the beginning",
                 found.parent)
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        for candidate in (path / artifacts.CHECKPOINTS / artifacts.LAST_CHECKPOINT,
                          path / artifacts.LAST_CHECKPOINT):
            if candidate.is_file():
                return candidate
        raise FinetuneError(f"resume={resume}: no checkpoints/last.ckpt in that folder; give a "
                            "run dir, a .ckpt file, or auto")
    if not path.is_file():
        raise FinetuneError(f"resume={resume}: no such file or run dir (relative paths start at "
                            f"{Path.cwd()})")
    return path


def check_resumable(path: Path, module: FinetuneModule, max_epochs: int | None = None,
                    ema: bool = False) -> tuple[list[str], list[list[str]]]:
    """The checkpoint must be of this model and this optimizer layout; then the run dir gets
    its metrics history up to the checkpoint's epoch, so curves and best epochs span both.
    Returns that history (header, rows), read now: the run dir may be the same one. Warns
    when the run would go on past the end of the schedule it resumes (at a learning rate of
    about 0)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise FinetuneError(f"resume={path}: cannot read the checkpoint "
                            f"({' '.join(str(err).split())[:200]})") from None
    if isinstance(saved, dict) and "state_dict" in saved and "optimizer_states" not in saved:
        raise FinetuneError(f"resume={path}: the checkpoint holds weights only (best.ckpt, or "
                            "checkpoint.optimizer=false), not the optimizer and schedule a "
                            "resume continues; start a new run from its weights instead "
                            f"(weights.source=file weights.path={path})")
    if not isinstance(saved, dict) or "finetune" not in saved or "state_dict" not in saved:
        raise FinetuneError(f"resume={path}: not a checkpoint written by finetune (no "
                            "'finetune' entry); resume from a run's checkpoints/last.ckpt")
    written_with_ema = "current_model_state" in saved
    if written_with_ema and not ema:
        raise FinetuneError(f"resume={path}: the checkpoint was written with model.ema (its "
                            "state_dict is the EMA, the live weights are kept apart); resume "
                            "with the same model.ema.decay, or start a new run from its EMA "
                            f"weights (weights.source=file weights.path={path})")
    damaged = checkpoint_damage(saved)
    if damaged:
        raise FinetuneError(f"resume={path}: the checkpoint is damaged ({damaged}); resume "
                            "from another one (checkpoints/last.ckpt of the run), or start anew")
    ours = module.state_dict()
    theirs = saved["state_dict"]
    differ = sorted(k for k in set(ours) | set(theirs)
                    if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    if differ:
        raise FinetuneError(f"resume={path}: the checkpoint is of another model ({len(differ)} "
                            f"tensors differ, e.g. {differ[0]}); resume with the recipe and "
                            "overrides it was trained with (rerun=RUN_DIR resume=RUN_DIR)")
    stages = int(saved["finetune"]["stages"])
    expected = [g.name for g in module.groups if g.stage < stages]
    if expected != list(saved["finetune"]["groups"]):
        raise FinetuneError(f"resume={path}: the optimizer groups differ (checkpoint: "
                            f"{', '.join(saved['finetune']['groups'])}; this config: "
                            f"{', '.join(expected)}); resume with the freeze and optim settings "
                            "it was trained with")
    mismatch = optimizer_state_problem(saved["optimizer_states"], module, stages)
    if mismatch:
        raise FinetuneError(f"resume={path}: the checkpoint is damaged ({mismatch}); resume "
                            "from another one (checkpoints/last.ckpt of the run), or start anew")
    progress = saved.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    whole = bool(progress.get("is_last_batch", True))  # saved at the end of an epoch
    epoch, step = int(saved["epoch"]), int(saved.get("global_step", 0))
    where = (f"epoch {epoch} done, step {step}" if whole else
             f"stopped in epoch {epoch} after {progress.get('current', {}).get('completed', '?')}"
             f" of its batches, step {step}")
    log.info("resume: from %s (%s; %d freeze stages begun)", path, where, stages)
    ended = schedule_end(saved, epoch + 1 if whole else epoch)
    if ended is not None and max_epochs is not None and max_epochs > ended[1]:
        name, length = ended
        log.warning(
            "resume: the checkpoint's %s schedule ended with epoch %d (its length, "
            "sched.epochs or the first run's trainer.max_epochs, is kept on resume): epochs "
            "%d..%d would train at a learning rate of about 0. To train them, start a fresh "
            "schedule from its weights instead (the same recipe with weights.source=run "
            "weights.path=%s trainer.max_epochs=%d); to stop a run early and extend it later, "
            "give it its full length at the start (sched.epochs=N)", name, length - 1,
            length, max_epochs - 1, path.parent.parent, max_epochs - length)
    return artifacts.metrics_history(path.parent.parent / artifacts.METRICS_CSV,
                                     int(saved["epoch"]))


def checkpoint_damage(saved: dict[str, Any]) -> str | None:
    """What is wrong with the layout of a checkpoint finetune wrote (None: nothing), checked
    before anything of it is used: each entry a resume reads, with its type."""
    ours = saved.get("finetune")
    if not isinstance(ours, dict) or not _whole(ours.get("stages")) or not (
            isinstance(ours.get("groups"), list) and all(isinstance(g, str)
                                                         for g in ours["groups"])):
        return "its 'finetune' entry lacks the stages count or the optimizer group names"
    state = saved["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return "its state_dict is not a mapping of names to tensors"
    missing = [k for k in ("epoch", "global_step") if not _whole(saved.get(k))]
    if missing:
        return f"no whole-number {' or '.join(missing)}"
    optimizers = saved.get("optimizer_states")
    if not isinstance(optimizers, list) or not all(
            isinstance(o, dict) and isinstance(o.get("state"), dict)
            and isinstance(o.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in o["param_groups"]) for o in optimizers):
        return "its optimizer_states are not optimizer state dicts"
    if not all(isinstance(v, dict) for o in optimizers for v in o["state"].values()):
        return "an optimizer's per-parameter state is not a mapping"
    tensors = [*state.items(), *((f"optimizer state {k}", t) for o in optimizers
                                 for v in o["state"].values() for k, t in v.items()
                                 if isinstance(t, torch.Tensor))]
    bad = [k for k, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return f"{len(bad)} tensors hold NaN or infinity, e.g. {', '.join(bad[:3])}"
    for key, kind in (("loops", dict), ("lr_schedulers", list), ("callbacks", dict)):
        if key in saved and not isinstance(saved[key], kind):
            return f"its {key} entry is a {type(saved[key]).__name__}, not a {kind.__name__}"
    if not all(isinstance(s, dict) for s in saved.get("lr_schedulers", [])):
        return "a learning-rate schedule's state is not a mapping"
    node: Any = saved.get("loops", {})
    for key in ("fit_loop", "epoch_loop.batch_progress", "current"):
        node = node.get(key, {})
        if not isinstance(node, dict):
            return f"its loop state {key} is a {type(node).__name__}"
    return None


def optimizer_state_problem(states: list[dict[str, Any]], module: FinetuneModule,
                            stages: int) -> str | None:
    """Whether the saved optimizer state fits this run's optimizer: the same groups of the
    same sizes, and per parameter the entries this optimizer keeps (found by stepping it
    once on a probe parameter), each of the parameter's shape. Lightning would load a
    mismatch silently and fail at the first step."""
    from finetune.optim import torch_groups
    from finetune.registry import make_optimizer

    if len(states) != 1:
        return f"{len(states)} optimizer states, not 1"
    probe = nn.Parameter(torch.zeros(2))
    probe.grad = torch.zeros(2)
    stepped = make_optimizer(module.optim_cfg, [probe])
    stepped.step()
    expected = sorted(stepped.state[probe])
    groups = torch_groups([g for g in module.groups if g.stage < stages], module.model)
    saved_groups = states[0]["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if [len(g["params"]) for g in saved_groups] != sizes:
        return f"its optimizer groups hold {[len(g['params']) for g in saved_groups]} " \
               f"parameters, this run's {sizes}"
    shapes = {pid: p.shape for saved, ours in zip(saved_groups, groups, strict=True)
              for pid, p in zip(saved["params"], ours["params"], strict=True)}
    for pid, entry in states[0]["state"].items():
        if pid not in shapes:
            return f"optimizer state for parameter {pid!r}, which no group holds"
        if sorted(entry) != expected:
            return (f"the optimizer state of parameter {pid} holds {', '.join(map(str, entry))}"
                    f", not {', '.join(expected)}")
        wrong = [k for k, t in entry.items() if isinstance(t, torch.Tensor) and t.dim() > 0
                 and t.shape != shapes[pid]]
        if wrong:
            return (f"the optimizer's {wrong[0]} of parameter {pid} has shape "
                    f"{list(entry[wrong[0]].shape)}, the parameter {list(shapes[pid])}")
    return None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def schedule_end(saved: dict[str, Any], next_epoch: int) -> tuple[str, int] | None:
    """(schedule name, its length in epochs) when the checkpoint's schedule has decayed to
    about 0 by `next_epoch`, else None (it still moves, or never ends: none, step, plateau)."""
    from types import SimpleNamespace

    from finetune.schedules import SCHEDULES

    state = (saved.get("lr_schedulers") or [{}])[0]
    shape = SCHEDULES.get(str(state.get("name")))
    if shape is None or not isinstance(state.get("epochs"), int):
        return None
    schedule = SimpleNamespace(**state)
    t = next_epoch if shape.owns_warmup else next_epoch - int(state.get("warmup", 0))
    if next_epoch < state["epochs"] or t < 0 or shape.factor(schedule, float(t)) > 1e-3:
        return None
    return shape.name, int(state["epochs"])


def log_built(cfg: DictConfig, built: Built) -> None:
    ops = len(cfg.surgery)
    log.info("build: %s; head at %s; surgery: %d ops", cfg.model.name,
             ", ".join(built.head_paths) or "none", ops)


def input_too_small(err: RuntimeError, cfg: DictConfig) -> FinetuneError | None:
    """A shape error from pooling/conv on inputs smaller than the network can take."""
    text = str(err)
    if "Output size is too small" not in text and "Kernel size can't be greater" not in text:
        return None
    hint = (" (inception_v3's auxiliary head needs about 299 px: or set "
            "model.kwargs.aux_logits=false)" if cfg.model.name == "inception_v3" else "")
    return FinetuneError(f"{cfg.model.name} cannot take {cfg.data.image_size} px inputs "
                         f"({text.splitlines()[0]}); raise data.image_size{hint}")


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.1f}%)"


def make_loggers(name: str, run_dir: Path) -> list[Logger]:
    """metrics.csv always; the chosen logger's beside it (finetune/loggers.py; validate
    checked that its package is installed)."""
    return [CSVLogger(save_dir=run_dir, name="", version=""), *LOGGERS[name].make(run_dir)]


def checkpoints_kept(keep: str, sweep: bool) -> str:
    """checkpoint.keep resolved: auto is last for a run (to resume from) and none for a
    sweep job, whose weights are its model.safetensors."""
    return ("none" if sweep else "last") if keep == "auto" else keep


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
    callbacks = [
        # best.ckpt holds weights only: a resume continues from last.ckpt
        *([ModelCheckpoint(dirpath=run_dir / artifacts.CHECKPOINTS, filename="best",
                           monitor=MONITOR, mode="max", auto_insert_metric_name=False,
                           enable_version_counter=False, save_weights_only=True)]
          if keep in ("best", "both") else []),
        # Lightning 2.6's save_last only refreshes last.ckpt when a top-k save happened in the
        # same step; a monitor-less checkpoint keeps it truly the last.
        *([ModelCheckpoint(dirpath=run_dir / artifacts.CHECKPOINTS, filename="last",
                           monitor=None, save_top_k=1, enable_version_counter=False,
                           save_weights_only=not cfg.checkpoint.optimizer)]
          if keep in ("last", "both") else []),
        meter,  # before the cache: computing the features counts as training time
        SaveOnInterrupt(run_dir, lambda message, path: artifacts.write_json(
            run_dir / artifacts.METRICS, {"status": "interrupted", "error": [message],
                                          "checkpoint": path})),
        *([features] if isinstance(features, cache.FeatureCache) else []),
    ]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    if cfg.model.ema.decay is not None:
        callbacks.append(EMA(cfg.model.ema.decay, cfg.model.ema.start_epoch))
    if best_weights:
        callbacks.append(BestWeights(cfg.metric))
    callbacks += extra or []
    stopping = trainer_kwargs.pop("early_stopping")
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
    trainer_kwargs["enable_checkpointing"] = keep != "none"  # else Lightning adds its own
    trainer = pl.Trainer(default_root_dir=run_dir, logger=loggers, callbacks=callbacks,
                         use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
                         **trainer_kwargs)
    log.info("trainer: %s, %d device(s), %d process(es), precision %s",
             trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower(),
             trainer.num_devices, trainer.world_size, trainer.precision)
    return trainer, meter


def optimizer_summary(cfg: DictConfig, model: nn.Module, groups: list[Any]) -> dict[str, Any]:
    """The optimizer and its planned groups (every stage's), for the manifest and report."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return {"name": cfg.optim.name, "groups": [
        {"name": g.name, "join_epoch": g.join_epoch, "lr": g.lr, "weight_decay": g.weight_decay,
         "tensors": len(g.params), "parameters": sum(sizes.get(n, 0) for n in g.params)}
        for g in groups]}


def entry_name(entry: Any) -> str | None:
    """The name of a pretrained entry: torchvision's enum member, or timm's arch.tag."""
    if isinstance(entry, dict):
        arch, tag = entry.get("architecture"), entry.get("tag")
        return f"{arch}.{tag}" if arch and tag else arch
    return getattr(entry, "name", None)


def write_manifest(run_dir: Path, cfg: DictConfig, context: RunContext, built: Built,
                   prep: backbones.Preprocessing, class_names: list[str] | None,
                   freeze: FreezePlan | None, balance: dict[str, Any] | None = None,
                   ema: dict[str, Any] | None = None,
                   thresholds: dict[str, float] | None = None,
                   optimizer: dict[str, Any] | None = None) -> str:
    """model.safetensors and manifest.json: what is needed to use the model. Returns the
    weights' sha256."""
    model_sha = artifacts.save_weights(built.model, run_dir / artifacts.WEIGHTS)
    surgery_ops = OmegaConf.to_container(cfg.surgery, resolve=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(surgery_ops, list) and isinstance(config, dict)
    Manifest(
        model_name=cfg.model.name, model_source=model_source_of(cfg).name,
        build_kwargs=built.build_kwargs,
        head={"type": cfg.head.type, "num_classes": len(class_names) if class_names else None,
              "dropout": cfg.head.dropout, "hidden": list(cfg.head.hidden),
              "paths": built.head_paths},
        surgery=surgery_ops, output_shape=built.output_shape, class_names=class_names,
        preprocessing=prep.to_dict(), model_sha256=model_sha, recipe=context.recipe,
        overrides=list(context.overrides),
        freeze={"train_from": freeze.train_from if freeze else None, "bn": cfg.freeze.bn,
                "stages": [s.to_dict() for s in freeze.stages] if freeze else []},
        resumed_from=str(cfg.resume) if cfg.resume else None,
        weights={k: getattr(built.report, k) for k in ("source", "path", "url", "sha256",
                                                        "hub")}
        | {"name": entry_name(source_of(cfg).entry(cfg))},  # the entry DEFAULT is
        seed=cfg.seed, versions=artifacts.library_versions(), config=config,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), balance=balance or {}, ema=ema or {},
        task=cfg.task, thresholds=thresholds or {}, optimizer=optimizer or {},
    ).write(run_dir)
    return model_sha


def save_extractor(run_dir: Path, cfg: DictConfig, context: RunContext, built: Built,
                   prep: backbones.Preprocessing) -> float:
    """`head: none`: a feature extractor is built, loaded and saved; there is nothing to train."""
    artifacts.write_json(run_dir / artifacts.LOAD_REPORT, built.report.to_dict())
    log.info("head: none: a feature extractor giving %s per image; nothing to train",
             built.output_shape)
    log_built(cfg, built)
    write_manifest(run_dir, cfg, context, built, prep, None, None)
    artifacts.write_json(run_dir / artifacts.METRICS, {
        "status": "complete", "epochs": 0, "output_shape": built.output_shape,
        "total_params": sum(p.numel() for p in built.model.parameters())})
    print(f"finetune: feature extractor saved, output {built.output_shape} per image\n"
          f"  run dir: {run_dir}", flush=True)
    return float("nan")


def write_val_predictions(path: Path, data: ImageDataModule, predictions: list[Any],
                          thresholds: list[float] | None = None) -> None:
    """The final validation's prediction for each image: file path (or index for in-memory
    data), true and predicted class (task=multilabel: the label sets, `;`-separated, the
    prediction at the tuned thresholds)."""
    names = data.class_names
    items = getattr(data.val_set, "paths", None)

    def shown(label: Any) -> str:
        return names[label] if not isinstance(label, tuple | list) else ";".join(
            n for n, v in zip(names, label, strict=True) if v)

    rows = [[str(items[i]) if items is not None else f"#{i}", shown(data.val_set.labels[i]),
             shown(predicted if thresholds is None else tuple(
                 float(p >= t) for p, t in zip(predicted, thresholds, strict=True)))]
            for i, predicted in enumerate(predictions)]
    artifacts.write_csv(path, ["item", "label", "predicted"], rows)


def tune_thresholds(probs: list[list[float]], labels: list[tuple[float, ...]]
                    ) -> tuple[list[float], list[float]]:
    """task=multilabel: per label, the decision threshold (0.05, 0.10 ... 0.95) with the best
    F1 on the final validation (ties: the one nearest 0.5), and that F1."""
    import numpy as np

    p, y = np.asarray(probs), np.asarray(labels) > 0.5
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    thresholds, scores = [], []
    for k in range(p.shape[1]):
        f1 = []
        for t in grid:
            predicted = p[:, k] >= t
            tp = float(np.sum(predicted & y[:, k]))
            denominator = float(np.sum(predicted) + np.sum(y[:, k]))
            f1.append(2 * tp / denominator if denominator else 1.0)
        best = max(range(len(grid)), key=lambda i: (f1[i], -abs(grid[i] - 0.5)))
        thresholds.append(float(grid[best]))
        scores.append(round(f1[best], 6))
    return thresholds, scores


def write_report(run_dir: Path) -> None:
    """report.html; a report that cannot be built is a warning, never a failed run."""
    from finetune import html_report

    try:
        html_report.write_run_report(run_dir)
    except Exception as err:  # the run and its artifacts are complete without it
        log.warning("report: %s could not be built (%s); python -m finetune.report %s "
                    "rebuilds it", artifacts.REPORT, err, run_dir)


def evaluate_splits(run_dir: Path, cfg: DictConfig, model: nn.Module, data: ImageDataModule,
                    trainer: pl.Trainer) -> dict[str, Any]:
    """A one-class-per-image run's validation split (for the report) and test split evaluated
    (evaluation.py): evaluation.json, reliability.png (test_reliability.png),
    test_predictions.csv; returns the test figures for metrics.json (test/acc, ...)."""
    from finetune import evaluation, html_report

    names = data.class_names
    # images through the eval transform, from the splits (a feature cache has replaced the
    # loaders' datasets with the frozen prefix's outputs); the validation split for the
    # report (eval.report), the test split whenever there is one
    results: dict[str, Any] = {
        "val": evaluation.evaluate(model, data.eval_dataset("val"), names)[0]
    } if cfg.eval.report else {}
    flat: dict[str, Any] = {}
    if "test" in data.splits and data.test_set is not None:
        best = next((c for c in trainer.callbacks if isinstance(c, BestWeights)), None)
        tested, which = model, "last"
        if best is not None and best.state is not None:
            tested = copy.deepcopy(model)
            tested.load_state_dict(best.state)
            which = f"best (epoch {best.epoch}, {cfg.metric} {best.value:.4f})"
        result, outputs = evaluation.evaluate(tested, data.eval_dataset("test"), names)
        result["checkpoint"] = which
        results["test"] = result
        artifacts.write_csv(run_dir / artifacts.TEST_PREDICTIONS, evaluation.PREDICTION_HEADER,
                            evaluation.predictions_rows(outputs, names))
        flat = {**evaluation.flat(result, "test"), "test/checkpoint": which}
    for split, result in results.items() if cfg.eval.report else ():  # the report's diagrams
        png = run_dir / (artifacts.RELIABILITY if split == "val" else f"{split}_reliability.png")
        plots.plot_reliability(result["reliability"], png, f"{split} split")
        result["reliability_png"] = html_report.png_uri(png)
    artifacts.write_json(run_dir / artifacts.EVALUATION, results)
    return flat


def save_run(run_dir: Path, cfg: DictConfig, context: RunContext, built: Built,
             freeze: FreezePlan, data: ImageDataModule, prep: backbones.Preprocessing,
             module: FinetuneModule, trainer: pl.Trainer, meter: ThroughputMeter,
             cache_report: dict[str, Any] | None = None, groups: list[Any] | None = None
             ) -> dict[str, Any]:
    """Weights, manifest, plots, the evaluation of val and test, then metrics.json last: its
    status says the run is complete."""
    weights = module.class_weight
    thresholds, multilabel_info = None, {}
    if module.multilabel and module.last_predictions:
        thresholds, label_f1 = tune_thresholds(  # (the images validated: limit_val_batches)
            module.last_predictions, data.val_set.labels[:len(module.last_predictions)])
        multilabel_info = {"thresholds": dict(zip(data.class_names, thresholds, strict=True)),
                           "val/f1_per_label": dict(zip(data.class_names, label_f1,
                                                        strict=True))}
    write_manifest(run_dir, cfg, context, built, prep, data.class_names, freeze, {
        "class_counts": data.class_counts(), "sampler": "balanced" if data.balanced else
        "shuffle", "class_weights" if not module.multilabel else "pos_weight":
        weights.tolist() if weights is not None else None},
        ema_summary(trainer), multilabel_info.get("thresholds"),
        optimizer_summary(cfg, built.model, groups or []))
    tested = {} if module.multilabel or not (cfg.eval.report or data.test_set is not None) \
        else evaluate_splits(run_dir, cfg, built.model, data, trainer)
    series = artifacts.epoch_metrics(run_dir / artifacts.METRICS_CSV)
    plots.plot_curves(series, run_dir / artifacts.CURVES)
    if module.last_confusion is not None:
        plots.plot_confusion(module.last_confusion.tolist(), data.class_names,
                             run_dir / artifacts.CONFUSION)
    write_val_predictions(run_dir / artifacts.VAL_PREDICTIONS, data, module.last_predictions,
                          thresholds)
    final = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items()
             if k.startswith("val/")}
    accs = series.get(MONITOR, {})
    best_epoch = max(accs, key=lambda e: accs[e]) if accs else None
    throughput = meter.images_per_second
    world = trainer.world_size
    wait = meter.input_wait_share
    if wait is not None:
        cached = bool(cache_report and cache_report.get("status") != "off")
        log.info("input: %.1f%% of steady-state training time went to waiting for the next "
                 "batch%s", 100 * wait,
                 "; raise data.num_workers" if wait > 0.2 and not cached else "")
    nonfinite = [f"{k}={v}" for k, v in final.items() if not math.isfinite(v)]
    metrics = {
        "status": "failed" if nonfinite else "complete",
        **({"error": [nonfinite_message(nonfinite)]} if nonfinite else {}),
        **final,
        "best/val/acc": round(accs[best_epoch], 6) if best_epoch is not None else None,
        "best/epoch": best_epoch,
        "epochs": trainer.current_epoch,
        "train_images": len(data.train_set),
        "val_images": len(data.val_set),
        **({"test_images": len(data.test_set)} if data.test_set is not None else {}),
        **tested,
        "bad_images": len(data.bad_images),
        "train_seconds": round(meter.fit_seconds, 3),
        # all ranks together (rank zero's rate x the number of ranks)
        "train_images_per_second": round(throughput * world, 2) if throughput else None,
        "input_wait_share": round(wait, 4) if wait is not None else None,
        "first_step_seconds": round(meter.first_step_seconds, 3)
        if meter.first_step_seconds is not None else None,
        "world_size": world,
        **({"ddp": module.rank_check.result} if module.rank_check.result else {}),
        **({"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
           if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda" else {}),
        **parameter_counts(module.model),
        **({"early_stopping": stopped} if (stopped := early_stop_summary(trainer)) else {}),
        **({"pruned": pruned} if (pruned := pruned_summary(trainer)) else {}),
        **({"ema": averaged} if (averaged := ema_summary(trainer)) else {}),
        **({"task": "multilabel", **multilabel_info} if module.multilabel else {}),
        "train_from": freeze.train_from,
        "lr": float(cfg.optim.lr),
        "metric": cfg.metric,
        **({"feature_cache": cache_report} if cache_report else {}),
    }
    artifacts.write_json(run_dir / artifacts.METRICS, metrics)  # NaN as null, status failed
    if nonfinite:
        raise NonFiniteMetrics(nonfinite_message(nonfinite))
    return metrics


def ema_summary(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The EMA of the weights (model.ema), if the run kept one."""
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    return ema.summary() if ema is not None else None


def early_stop_summary(trainer: pl.Trainer) -> dict[str, Any] | None:
    """How and when early stopping ended the run (None: it did not)."""
    stopper = next((c for c in trainer.callbacks if isinstance(c, StopEarly)), None)
    return stopper.summary() if stopper is not None else None


def pruned_summary(trainer: pl.Trainer) -> dict[str, Any] | None:
    """When the study's pruner ended this trial's training (None: it did not)."""
    pruner = next((c for c in trainer.callbacks if isinstance(c, PruneTrial)), None)
    return pruner.summary() if pruner is not None else None


class NonFiniteMetrics(FinetuneError):
    """The run trained with a finite loss to the end, but its final validation metrics are
    NaN or infinite: metrics.json says so (status failed); never a `complete` run."""


def nonfinite_message(found: list[str]) -> str:
    return (f"the final validation metrics are not finite ({', '.join(found)}) although the "
            "training loss stayed finite: the model computes NaN or infinity in eval mode "
            "(BatchNorm statistics that overflowed, or 16-bit precision: try trainer.precision="
            "32-true); the run dir keeps its files for a look, but the run is not complete")


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
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    launched = time.time()
    from finetune import locations, prepare

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


SUMMARY_FILES = ("model.safetensors", "metrics.json", "load_report.json", "manifest.json",
                 "curves.png", "confusion_matrix.png", "report.html", "checkpoints/")


def print_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    best = metrics.get("best/val/acc")
    lines = [
        f"finetune: done in {metrics['train_seconds']:.1f} s over {metrics['epochs']} epochs; "
        f"val/acc {metrics.get(MONITOR, float('nan')):.4f} (best {best:.4f} at epoch "
        f"{metrics['best/epoch']})" if best is not None else
        f"finetune: done in {metrics['train_seconds']:.1f} s; no validation ran",
        f"  run dir: {run_dir}",
        "  " + "  ".join(name for name in SUMMARY_FILES if (run_dir / name.rstrip("/")).exists()
                         and (not name.endswith("/") or any((run_dir / name).iterdir()))),
    ]
    if "test/acc" in metrics:
        lines.insert(1, f"  test ({metrics['test/images']} images, {metrics['test/checkpoint']} "
                        f"weights): acc {metrics['test/acc']:.4f}, macro F1 "
                        f"{metrics['test/macro/f1']:.4f}, ECE {metrics['test/ece']:.4f}")
    stopped = metrics.get("early_stopping")
    if stopped:
        by = f" by more than {stopped['min_delta']:g}" if stopped["min_delta"] else ""
        lines.insert(1, f"  stopped early after epoch {stopped['stopped_epoch']}: "
                        f"{stopped['monitor']} did not improve{by} for {stopped['patience']} "
                        f"validations (best {stopped['best']:.4f}; trainer.early_stopping)")
    pruned = metrics.get("pruned")
    if pruned:
        lines.insert(1, f"  pruned after epoch {pruned['epoch']} of {pruned['of']}: the study's "
                        f"pruner ({pruned['metric']} {pruned['value']}) ended this trial")
    print("\n".join(lines), flush=True)
