"""One training run, top to bottom: validate -> build -> plan -> fit -> save."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from torch import nn
from torchvision.models import WeightsEnum

from finetune import artifacts, backbones, cache, plots, surgery
from finetune.builder import assemble
from finetune.callbacks import (
    AtomicCheckpointIO,
    SaveOnInterrupt,
    Terminated,
    ThroughputMeter,
    stop_name,
)
from finetune.data import ImageDataModule, build_datamodule
from finetune.errors import FinetuneError
from finetune.freezing import FreezePlan, apply_freeze, plan_freeze
from finetune.module import FinetuneModule
from finetune.validate import check_model_paths, validate
from finetune.weights import LoadReport, load_weights

log = logging.getLogger("finetune")
MONITOR = "val/acc"
VAL_PREDICTIONS = "val_predictions.csv"
BAD_IMAGES = "bad_images.csv"  # images skipped because they cannot be decoded
ERROR_FILE = "error.txt"  # the traceback of a run that failed on something other than input


def is_main_process() -> bool:
    """Rank zero (the only process, or rank 0 of DDP): the one that writes the run dir."""
    return rank_zero_only.rank == 0


def run(cfg: DictConfig, recipe_files: dict[str, Path] | None = None,
        rerun_of: dict[str, Path] | None = None) -> float:
    """Train as `cfg` says, write the run dir, return the final val/acc.

    A run stopped by a user error leaves metrics.json with status "failed" and the message;
    one stopped by Ctrl-C or SIGTERM, status "interrupted". Under DDP every rank runs this;
    only rank zero writes (and holds the run dir's lock: one run writes a dir at a time).
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    lock = artifacts.lock_run_dir(run_dir) if is_main_process() else None
    try:
        with _sigterm_as_interrupt():
            return _guarded_run(cfg, run_dir, recipe_files or {}, rerun_of or {})
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


def _guarded_run(cfg: DictConfig, run_dir: Path, recipe_files: dict[str, Path],
                 rerun_of: dict[str, Path]) -> float:
    if is_main_process():
        artifacts.write_json(run_dir / artifacts.METRICS, {"status": "running"})
    try:
        return _run(cfg, run_dir, recipe_files, rerun_of)
    except FinetuneError as err:
        if is_main_process():
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
            artifacts.write_bytes(run_dir / ERROR_FILE, traceback.format_exc().encode())
            artifacts.write_json(run_dir / artifacts.METRICS, {
                "status": "failed", "error": [f"{type(err).__name__}: {err}"],
                "traceback": ERROR_FILE})
        raise


def _run(cfg: DictConfig, run_dir: Path, recipe_files: dict[str, Path],
         rerun_of: dict[str, Path]) -> float:
    recipe = recipe_info(recipe_files, rerun_of)
    log.info("compose: recipe %s -> %s", recipe["name"], run_dir)
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    entry = pretrained_entry(cfg)
    prep = preprocessing_for(cfg, entry)
    if cfg.head.type == "none":
        check_model_paths(cfg, None, entry, prep.crop, prep.channels)
        if not is_main_process():
            return float("nan")
        return save_extractor(run_dir, cfg, recipe, build_model(cfg, None, entry, prep.crop,
                                                               prep.channels), prep)
    data = build_datamodule(cfg.data, prep, cfg.seed)
    num_classes = check_num_classes(cfg.head.num_classes, data.class_names)
    if data.bad_images and is_main_process():
        artifacts.write_csv(run_dir / BAD_IMAGES, ["path", "reason"],
                            [list(b) for b in data.bad_images])
        log.warning("data: skipped %d images that cannot be decoded (listed in %s), e.g. %s",
                    len(data.bad_images), run_dir / BAD_IMAGES, data.bad_images[0][0])
    log.info("data: %s, %d classes, %d train / %d val images, %s", cfg.data.name, num_classes,
             len(data.train_set), len(data.val_set), prep.to_dict())
    check_model_paths(cfg, data.class_names, entry, prep.crop, prep.channels)
    built = build_model(cfg, data.class_names, entry, prep.crop, prep.channels)
    if is_main_process():
        artifacts.write_json(run_dir / artifacts.LOAD_REPORT, built.report.to_dict())
    freeze = plan_from_config(built.model, cfg.freeze)
    apply_freeze(built.model, freeze)
    log.info("plan: train from %s; %s", freeze.train_from or "the first layer",
             trainable_summary(built.model))
    if is_main_process():  # what a report of a sweep still running can show
        artifacts.write_json(run_dir / artifacts.METRICS, {
            "status": "running", "train_from": freeze.train_from, "lr": float(cfg.optim.lr),
            "metric": cfg.metric, **parameter_counts(built.model)})
    for stage in freeze.stages[1:]:
        log.info("plan: at epoch %d, %s unfreezes (%d parameter tensors, group %s)",
                 stage.epoch, stage.selector, len(stage.params), stage.name)
    module = FinetuneModule(built.model, num_classes, freeze, cfg.optim, cfg.sched,
                            cfg.loss.label_smoothing, cfg.loss.aux_weight, cfg.seed,
                            cfg.model.channels_last, cfg.model.compile)
    checkpoint = resume_checkpoint(cfg.resume, run_dir)
    history = check_resumable(checkpoint, module) if checkpoint is not None else ([], [])
    features = feature_cache(cfg, built.model, freeze, len(data.train_set))
    trainer, meter = make_trainer(cfg, run_dir, history, features)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint, weights_only=True)
    except RuntimeError as err:
        friendly = input_too_small(err, cfg)
        if friendly is None:
            raise
        raise friendly from None
    if not trainer.is_global_zero:
        return float(trainer.callback_metrics.get(cfg.metric, float("nan")))
    metrics = save_run(run_dir, cfg, recipe, built, freeze, data, prep, module, trainer, meter,
                       cache_info(features))
    print_summary(run_dir, metrics)
    value = metrics.get(cfg.metric)
    return float(value) if value is not None else float("nan")


def feature_cache(cfg: DictConfig, model: nn.Module, freeze: FreezePlan,
                  train_images: int) -> cache.FeatureCache | str:
    """The feature cache callback for this run, or why there is none (`freeze.cache`)."""
    cut, reason = cache_decision(cfg, model, freeze, train_images)
    if cut is None:
        log.info("feature cache: %s", reason)
        return reason
    directory = cfg.freeze.cache_dir
    if directory is None and HydraConfig.get().mode.name == "MULTIRUN":
        directory = Path(HydraConfig.get().sweep.dir) / "feature_cache"
    return cache.FeatureCache(cut, Path(directory).expanduser() if directory else None,
                              write=is_main_process())


def cache_decision(cfg: DictConfig, model: nn.Module, freeze: FreezePlan,
                   train_images: int) -> tuple[cache.Cut | None, str]:
    """Whether this run caches the frozen prefix, and why (also what `inspect` shows)."""
    limit, batch = cfg.trainer.limit_train_batches, cfg.data.batch_size
    per_epoch = (min(1.0, float(limit)) if isinstance(limit, float)
                 else min(1.0, int(limit) * batch / max(1, train_images)))
    return cache.decide(cfg.freeze.cache, model, len(freeze.stages) > 1, bool(cfg.data.augment),
                        per_epoch * (cfg.trainer.max_epochs or 1))


def cache_info(features: cache.FeatureCache | str) -> dict[str, Any]:
    if isinstance(features, str):
        return {"status": "off", "reason": features}
    return features.info


def plan_from_config(model: nn.Module, freeze: Any) -> FreezePlan:
    """The freeze group resolved against the model (every selector checked)."""
    return plan_freeze(model, freeze.train_from, freeze.bn, freeze.modules, freeze.unfreeze)


def resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """`resume`: null; auto (this run dir's last.ckpt, when there is one); a .ckpt file; or
    a run dir (its checkpoints/last.ckpt)."""
    if resume is None:
        return None
    if resume == "auto":
        found = run_dir / "checkpoints" / "last.ckpt"
        if found.is_file():
            return found
        log.info("resume=auto: no checkpoint in %s yet; starting from the beginning",
                 found.parent)
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FinetuneError(f"resume={resume}: no checkpoints/last.ckpt in that folder; give a "
                            "run dir, a .ckpt file, or auto")
    if not path.is_file():
        raise FinetuneError(f"resume={resume}: no such file or run dir (relative paths start at "
                            f"{Path.cwd()})")
    return path


def check_resumable(path: Path, module: FinetuneModule
                    ) -> tuple[list[str], list[list[str]]]:
    """The checkpoint must be of this model and this optimizer layout; then the run dir gets
    its metrics history up to the checkpoint's epoch, so curves and best epochs span both.
    Returns that history (header, rows), read now: the run dir may be the same one."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise FinetuneError(f"resume={path}: cannot read the checkpoint "
                            f"({' '.join(str(err).split())[:200]})") from None
    if not isinstance(saved, dict) or "finetune" not in saved or "state_dict" not in saved:
        raise FinetuneError(f"resume={path}: not a checkpoint written by finetune (no "
                            "'finetune' entry); resume from a run's checkpoints/last.ckpt")
    ours = module.state_dict()
    theirs = saved["state_dict"]
    differ = sorted(k for k in set(ours) | set(theirs)
                    if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    if differ:
        raise FinetuneError(f"resume={path}: the checkpoint is of another model ({len(differ)} "
                            f"tensors differ, e.g. {differ[0]}); resume with the recipe and "
                            "overrides it was trained with (rerun=RUN_DIR resume=RUN_DIR)")
    stages = int(saved["finetune"]["stages"])
    from finetune.optim import param_groups

    expected = [g["name"] for g in param_groups(module.model, module.optim_cfg,
                                                module.freeze_plan, stages)]
    if expected != list(saved["finetune"]["groups"]):
        raise FinetuneError(f"resume={path}: the optimizer groups differ (checkpoint: "
                            f"{', '.join(saved['finetune']['groups'])}; this config: "
                            f"{', '.join(expected)}); resume with the freeze and optim settings "
                            "it was trained with")
    log.info("resume: from %s (epoch %d done, %d freeze stages begun)", path, saved["epoch"],
             stages)
    return artifacts.metrics_history(path.parent.parent / "metrics.csv", int(saved["epoch"]))


def pretrained_entry(cfg: DictConfig) -> WeightsEnum | None:
    if cfg.weights.source != "torchvision":
        return None
    return backbones.weights_enum(cfg.model.name, cfg.weights.name)


def preprocessing_entry(cfg: DictConfig, entry: WeightsEnum | None) -> WeightsEnum | None:
    """Whose eval transform to use: the weights loaded; for a file or URL, the architecture's
    usual weights (a .pth from torchvision expects their preprocessing); for random init, a
    run or a recipe, a plain resize to data.image_size with ImageNet statistics (what a run
    of this framework from scratch uses)."""
    if cfg.weights.source in ("file", "url"):
        return backbones.weights_enum(cfg.model.name, "DEFAULT")
    return entry


def preprocessing_for(cfg: DictConfig, entry: WeightsEnum | None) -> backbones.Preprocessing:
    """The eval preprocessing of a run: the weights' own, scaled and overridden by `data`."""
    return backbones.preprocessing(preprocessing_entry(cfg, entry), cfg.data.image_size,
                                   cfg.data.mean, cfg.data.std, cfg.data.channels)


def check_num_classes(configured: int | None, class_names: list[str]) -> int:
    if configured is not None and configured != len(class_names):
        raise FinetuneError(f"head.num_classes={configured} but the data has {len(class_names)} "
                            f"classes ({', '.join(class_names[:12])}); set head.num_classes="
                            f"{len(class_names)}, or null to follow the data")
    return len(class_names)


@dataclass
class Built:
    """The model as built, and how: builder arguments, head paths, the weight load, and the
    output shape of one image in a dry forward."""

    model: nn.Module
    build_kwargs: dict[str, Any]
    head_paths: list[str]
    report: LoadReport
    output_shape: list[int]


def build_model(cfg: DictConfig, class_names: list[str] | None, entry: WeightsEnum | None,
                input_size: int, channels: int = 3, train_sources: bool = True) -> Built:
    """backbone -> head -> surgery -> weights: the pretrained tensors that still fit (by name
    and shape, after the surgery moved modules) are copied in.

    Args:
        class_names: the new head's classes; None keeps no head (`head: none`).
        input_size, channels: the dry-forward batch that infers `auto` sizes, checks shapes.
        train_sources: whether a recipe source without a run may be trained now.
    """
    user_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    ops = OmegaConf.to_container(cfg.surgery, resolve=True)
    assert isinstance(user_kwargs, dict) and isinstance(ops, list)
    build_kwargs = {**(backbones.pretrained_kwargs(cfg.model.name, entry) if entry else {}),
                    **user_kwargs}
    parts = assemble(cfg.model.name, build_kwargs,
                     len(class_names) if class_names is not None else None, cfg.head.dropout,
                     list(cfg.head.hidden), ops, input_size, channels)
    model, head_paths = parts.model, parts.head_paths
    log.info("build: %s; head at %s; surgery: %d ops%s", cfg.model.name,
             ", ".join(head_paths) or "none", len(ops),
             f", pretrained keys moved: {parts.operated.key_map}" if parts.operated.key_map else "")
    report = load_weights(model, cfg.weights, cfg.model.name, head_paths, parts.operated.map_key,
                          class_names, train_sources)
    output = surgery.io_shapes(model, input_size, paths=[], channels=channels)[""][1]
    return Built(model, build_kwargs, head_paths, report, list(output[1:]))


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
    """metrics.csv always; TensorBoard or MLflow beside it when asked for (validate checked
    that their package is installed)."""
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="", version="")]
    if name == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""))
    elif name == "mlflow":
        from pytorch_lightning.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name="finetune",
                                    tracking_uri=(run_dir / "mlruns").as_uri()))
    return loggers


def make_trainer(cfg: DictConfig, run_dir: Path,
                 history: tuple[list[str], list[list[str]]] = ([], []),
                 features: cache.FeatureCache | str | None = None,
                 ) -> tuple[pl.Trainer, ThroughputMeter]:
    """The Lightning Trainer with our checkpoints, loggers and meter. `history`: a resumed
    run's earlier metrics (header, rows), which metrics.csv starts with; `features`: the
    feature cache callback, when the run caches."""
    meter = ThroughputMeter()
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=MONITOR,
                        mode="max", auto_insert_metric_name=False, enable_version_counter=False),
        # Lightning 2.6's save_last only refreshes last.ckpt when a top-k save happened in the
        # same step; a monitor-less checkpoint keeps it truly the last.
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None,
                        save_top_k=1, enable_version_counter=False),
        meter,  # before the cache: computing the features counts as training time
        SaveOnInterrupt(run_dir, lambda message, path: artifacts.write_json(
            run_dir / artifacts.METRICS, {"status": "interrupted", "error": [message],
                                          "checkpoint": path})),
        *([features] if isinstance(features, cache.FeatureCache) else []),
    ]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    loggers = make_loggers(cfg.logger.name, run_dir)
    header, rows = history
    if header and is_main_process():
        writer = loggers[0].experiment  # created now: it deletes an old metrics.csv
        artifacts.write_csv(run_dir / "metrics.csv", header, rows)
        # Known columns: the writer appends to the carried file instead of rewriting it with
        # only the columns it has seen (which would fail on the older rows).
        writer.metrics_keys = list(header)
    # Our samplers shard for DDP themselves (the shuffling order and augmentation seeds per
    # epoch; validation split across ranks), so Lightning must not replace them.
    trainer = pl.Trainer(default_root_dir=run_dir, logger=loggers, callbacks=callbacks,
                         use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
                         **trainer_kwargs)
    return trainer, meter


def recipe_info(recipe_files: dict[str, Path], rerun_of: dict[str, Path]) -> dict[str, Any]:
    name = HydraConfig.get().runtime.choices.get("recipe")
    path = recipe_files.get(name) if name else None
    info = {"name": name, "file": str(path) if path else None,
            "sha256": artifacts.file_sha256(path) if path else None}
    if name in rerun_of:
        info["rerun_of"] = str(rerun_of[name])
    return info


def write_manifest(run_dir: Path, cfg: DictConfig, recipe: dict[str, Any], built: Built,
                   prep: backbones.Preprocessing, class_names: list[str] | None,
                   freeze: FreezePlan | None) -> str:
    """model.safetensors and manifest.json: what is needed to use the model. Returns the
    weights' sha256."""
    model_sha = artifacts.save_weights(built.model, run_dir / artifacts.WEIGHTS)
    surgery_ops = OmegaConf.to_container(cfg.surgery, resolve=True)
    artifacts.write_json(run_dir / artifacts.MANIFEST, {
        "format": 1,
        "recipe": recipe,
        "overrides": list(HydraConfig.get().overrides.task),
        "model": {"name": cfg.model.name, "build_kwargs": built.build_kwargs},
        "head": {"type": cfg.head.type,
                 "num_classes": len(class_names) if class_names else None,
                 "dropout": cfg.head.dropout, "hidden": list(cfg.head.hidden),
                 "paths": built.head_paths},
        "surgery": surgery_ops,
        "output_shape": built.output_shape,
        "freeze": {"train_from": freeze.train_from if freeze else None, "bn": cfg.freeze.bn,
                   "stages": [s.to_dict() for s in freeze.stages] if freeze else []},
        "resumed_from": str(cfg.resume) if cfg.resume else None,
        "class_names": class_names,
        "preprocessing": prep.to_dict(),
        "weights": {k: getattr(built.report, k) for k in ("source", "path", "url", "sha256")}
                   | {"name": cfg.weights.name if cfg.weights.source == "torchvision" else None},
        "model_sha256": model_sha,
        "seed": cfg.seed,
        "versions": artifacts.library_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return model_sha


def save_extractor(run_dir: Path, cfg: DictConfig, recipe: dict[str, Any], built: Built,
                   prep: backbones.Preprocessing) -> float:
    """`head: none`: a feature extractor is built, loaded and saved; there is nothing to train."""
    artifacts.write_json(run_dir / artifacts.LOAD_REPORT, built.report.to_dict())
    log.info("head: none: a feature extractor giving %s per image; nothing to train",
             built.output_shape)
    write_manifest(run_dir, cfg, recipe, built, prep, None, None)
    artifacts.write_json(run_dir / artifacts.METRICS, {
        "status": "complete", "epochs": 0, "output_shape": built.output_shape,
        "total_params": sum(p.numel() for p in built.model.parameters())})
    print(f"finetune: feature extractor saved, output {built.output_shape} per image\n"
          f"  run dir: {run_dir}", flush=True)
    return float("nan")


def write_val_predictions(path: Path, data: ImageDataModule, predictions: list[int]) -> None:
    """The final validation's prediction for each image: file path (or index for in-memory
    data), true and predicted class."""
    names = data.class_names
    items = getattr(data.val_set, "paths", None)
    rows = [[str(items[i]) if items is not None else f"#{i}", names[data.val_set.labels[i]],
             names[predicted]] for i, predicted in enumerate(predictions)]
    artifacts.write_csv(path, ["item", "label", "predicted"], rows)


def save_run(run_dir: Path, cfg: DictConfig, recipe: dict[str, Any], built: Built,
             freeze: FreezePlan, data: ImageDataModule, prep: backbones.Preprocessing,
             module: FinetuneModule, trainer: pl.Trainer, meter: ThroughputMeter,
             cache_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Weights, manifest, plots, then metrics.json last: its status says the run is complete."""
    write_manifest(run_dir, cfg, recipe, built, prep, data.class_names, freeze)
    series = artifacts.epoch_metrics(run_dir / "metrics.csv")
    plots.plot_curves(series, run_dir / "curves.png")
    if module.last_confusion is not None:
        plots.plot_confusion(module.last_confusion.tolist(), data.class_names,
                             run_dir / "confusion_matrix.png")
    write_val_predictions(run_dir / VAL_PREDICTIONS, data, module.last_predictions)
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
    metrics = {
        "status": "complete",
        **final,
        "best/val/acc": round(accs[best_epoch], 6) if best_epoch is not None else None,
        "best/epoch": best_epoch,
        "epochs": trainer.current_epoch,
        "train_images": len(data.train_set),
        "val_images": len(data.val_set),
        "bad_images": len(data.bad_images),
        "train_seconds": round(meter.fit_seconds, 3),
        # all ranks together (rank zero's rate x the number of ranks)
        "train_images_per_second": round(throughput * world, 2) if throughput else None,
        "input_wait_share": round(wait, 4) if wait is not None else None,
        "first_step_seconds": round(meter.first_step_seconds, 3)
        if meter.first_step_seconds is not None else None,
        "world_size": world,
        **({"ddp": module.rank_check} if module.rank_check else {}),
        **({"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
           if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda" else {}),
        **parameter_counts(module.model),
        "train_from": freeze.train_from,
        "lr": float(cfg.optim.lr),
        "metric": cfg.metric,
        **({"feature_cache": cache_report} if cache_report else {}),
    }
    artifacts.write_json(run_dir / artifacts.METRICS, metrics)
    return metrics


def print_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    best = metrics.get("best/val/acc")
    lines = [
        f"finetune: done in {metrics['train_seconds']:.1f} s over {metrics['epochs']} epochs; "
        f"val/acc {metrics.get(MONITOR, float('nan')):.4f} (best {best:.4f} at epoch "
        f"{metrics['best/epoch']})" if best is not None else
        f"finetune: done in {metrics['train_seconds']:.1f} s; no validation ran",
        f"  run dir: {run_dir}",
        "  model.safetensors  metrics.json  load_report.json  manifest.json  curves.png  "
        "confusion_matrix.png  checkpoints/",
    ]
    print("\n".join(lines), flush=True)
