"""What a finished run leaves in its run dir: the weights, manifest, metrics, predictions, the
evaluation of its splits, plots and report.html, and the summary it prints."""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from finetune.data.datamodule import ImageDataModule
from finetune.errors import FinetuneError
from finetune.models import adapters, backbones
from finetune.models.sources import model_source_of
from finetune.rundir import (
    artifacts,
    box_evaluation,
    evaluation,
    html_report,
    mask_evaluation,
    plots,
)
from finetune.rundir.manifest import Manifest
from finetune.rundir.verdict import learning_warnings, speed_line
from finetune.sweeps.pruning import PruneTrial
from finetune.tasks.base import Task
from finetune.tasks.table import DEFAULT as DEFAULT_TASK
from finetune.tasks.table import task_of
from finetune.training import flops
from finetune.training.callbacks import (
    EMA,
    BestWeights,
    StopEarly,
    ThroughputMeter,
)
from finetune.training.freezing import FreezePlan
from finetune.training.lightning_module import FinetuneModule
from finetune.training.plan import Built, RunContext
from finetune.weights.sources import source_of

log = logging.getLogger("finetune")


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


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
    weights' sha256. With adapters, model.safetensors holds them merged (the plain
    architecture) and adapter.safetensors the adapter alone."""
    model, adapter = built.model, {}
    if built.adapter is not None:
        model, adapter = save_adapter(run_dir, built, prep)
    model_sha = artifacts.save_weights(model, run_dir / artifacts.WEIGHTS)
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
        adapter=adapter,
    ).write(run_dir)
    return model_sha


# merged and adapted outputs may differ by float rounding only: past this (relative to the
# outputs' largest magnitude) the merge is wrong and nothing is saved
MERGE_TOLERANCE = 1e-4


def save_adapter(run_dir: Path, built: Built, prep: backbones.Preprocessing
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """adapter.safetensors (the adapters and the modules trained fully), and the model with
    its adapters merged, checked against the adapted one on a fixed random batch. Returns
    the merged model and what the manifest records."""
    plan = built.adapter
    assert plan is not None
    sha = artifacts.save_tensors(adapters.adapter_state(built.model, plan),
                                 run_dir / artifacts.ADAPTER)
    merged = adapters.merged_copy(built.model)
    batch = torch.randn(2, prep.channels, prep.crop, prep.crop,
                        generator=torch.Generator().manual_seed(0))
    device = next(built.model.parameters()).device
    modes = built.model.training
    built.model.eval()
    merged.eval()
    with torch.inference_mode():
        adapted, plain = (out[0] if isinstance(out, tuple | list) else out  # (aux logits)
                          for out in (built.model(batch.to(device)), merged(batch.to(device))))
    built.model.train(modes)
    scale = max(1.0, float(adapted.abs().max()))
    gap = float((adapted - plain).abs().max()) / scale
    if not gap <= MERGE_TOLERANCE:
        raise FinetuneError(f"merging the adapters changed the model's outputs by {gap:.2e} "
                            f"(relative; at most {MERGE_TOLERANCE:g} is rounding); "
                            f"{artifacts.ADAPTER} is saved, the merged model is not")
    trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in merged.parameters())
    return merged, {**plan.to_dict(), "file": artifacts.ADAPTER, "sha256": sha,
                    "base_sha256": built.base_sha256, "merge_max_diff": gap,
                    "trainable_params": trainable, "trainable_share": round(trainable / total,
                                                                             6)}


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


def write_val_predictions(path: Path, data: Any, predictions: list[Any],
                          task: Task, finished: dict[str, Any]) -> None:
    """The final validation's predictions, as the task tabulates them: per image the file
    path (or index for in-memory data), true and predicted label (one class; or a label
    set, `;`-separated, decided at the tuned thresholds); per box for a detector."""
    items = getattr(data.val_set, "paths", None)
    shown = [str(items[i]) if items is not None else f"#{i}" for i in range(len(predictions))]
    header, rows = task.val_prediction_table(shown, data.val_set.labels, predictions,
                                             finished, data.class_names)
    artifacts.write_csv(path, header, rows)


def write_report(run_dir: Path) -> None:
    """report.html; a report that cannot be built is a warning, never a failed run."""

    try:
        html_report.write_run_report(run_dir)
    except Exception as err:  # the run and its artifacts are complete without it
        log.warning("report: %s could not be built (%s); finetune report %s "
                    "rebuilds it", artifacts.REPORT, err, run_dir)


def evaluate_splits(run_dir: Path, cfg: DictConfig, model: nn.Module, data: ImageDataModule,
                    trainer: pl.Trainer) -> dict[str, Any]:
    """A one-class-per-image run's validation split (for the report) and test split evaluated
    (evaluation.py): evaluation.json, reliability.png (test_reliability.png),
    test_predictions.csv; returns the test figures for metrics.json (test/acc, ...)."""

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


def evaluate_box_split(run_dir: Path, model: nn.Module, data: ImageDataModule) -> None:
    """A detector's validation split (box_evaluation.py), for the report: evaluation.json
    (AP per class, the PR curve, the worst images) and pr_curve.png."""
    result, _ = box_evaluation.evaluate_boxes(model, data.val_set, data.class_names)
    plots.plot_pr_curve(result["pr_curve"], run_dir / artifacts.PR_CURVE, "val split")
    result["pr_curve_png"] = html_report.png_uri(run_dir / artifacts.PR_CURVE)
    artifacts.write_json(run_dir / artifacts.EVALUATION, {"val": result})


def evaluate_mask_split(run_dir: Path, model: nn.Module, data: ImageDataModule) -> None:
    """A segmentation model's validation split (mask_evaluation.py), for the report:
    evaluation.json (IoU per class, the pixel confusion matrix, the worst images drawn beside
    their true and predicted masks)."""
    paths = data.val_set.paths
    result, _ = mask_evaluation.evaluate_masks(
        model, data.val_set, data.class_names,
        items=[str(p) for p in paths] if paths is not None else None)
    artifacts.write_json(run_dir / artifacts.EVALUATION, {"val": result})


def save_run(run_dir: Path, cfg: DictConfig, context: RunContext, built: Built,
             freeze: FreezePlan, data: ImageDataModule, prep: backbones.Preprocessing,
             module: FinetuneModule, trainer: pl.Trainer, meter: ThroughputMeter,
             cache_report: dict[str, Any] | None = None, groups: list[Any] | None = None,
             found: dict[str, Any] | None = None) -> dict[str, Any]:
    """Weights, manifest, plots, the evaluation of val and test, then metrics.json last: its
    status says the run is complete."""
    weights, task = module.class_weight, module.task
    # what the task decides after fit (task=multilabel: each label's threshold), on the
    # images validated last (limit_val_batches)
    finished = task.finish(module.last_predictions, data.val_set.labels, data.class_names)
    balance: dict[str, Any] = {"class_counts": data.class_counts(),
                               "sampler": "balanced" if data.balanced else "shuffle"}
    if task.loss_weights:
        balance[task.loss_weights] = weights.tolist() if weights is not None else None
    write_manifest(run_dir, cfg, context, built, prep, data.class_names, freeze, balance,
        ema_summary(trainer), finished.get("thresholds"),
        optimizer_summary(cfg, built.model, groups or []))
    tested = {} if not task.evaluates or not (cfg.eval.report or data.test_set is not None) \
        else evaluate_splits(run_dir, cfg, built.model, data, trainer)
    if task.model_kind == "detector" and cfg.eval.report:
        evaluate_box_split(run_dir, built.model, data)
    if task.model_kind == "segmenter" and cfg.eval.report:
        evaluate_mask_split(run_dir, built.model, data)
    series = artifacts.epoch_metrics(run_dir / artifacts.METRICS_CSV)
    plots.plot_curves(series, run_dir / artifacts.CURVES)
    if module.last_confusion is not None:
        plots.plot_confusion(module.last_confusion.tolist(), data.class_names,
                             run_dir / artifacts.CONFUSION)
    write_val_predictions(run_dir / artifacts.VAL_PREDICTIONS, data, module.last_predictions,
                          task, finished)
    final = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items()
             if k.startswith("val/")}
    accs = series.get(task.headline, {})
    best_epoch = max(accs, key=lambda e: accs[e]) if accs else None
    throughput = meter.images_per_second
    peak, peak_source = flops.peak_of(trainer.strategy.root_device, trainer.precision,
                                      cfg.trainer.peak_tflops)
    world = trainer.world_size
    wait = meter.input_wait_share
    if wait is not None:
        cached = bool(cache_report and cache_report.get("status") != "off")
        log.info("input: %.1f%% of steady-state training time went to waiting for the next "
                 "batch%s", 100 * wait,
                 "; raise data.num_workers" if wait > 0.2 and not cached else "")
    nonfinite = [f"{k}={v}" for k, v in final.items() if not math.isfinite(v)]
    warnings = learning_warnings(
        module.last_confusion.tolist() if module.last_confusion is not None else None,
        data.class_names, final.get("val/loss"), series, task.counted, task.accuracy)
    metrics = {
        "status": "failed" if nonfinite else "complete",
        **({"error": [nonfinite_message(nonfinite)]} if nonfinite else {}),
        **({"warnings": warnings} if warnings else {}),
        **final,
        f"best/{task.headline}": round(accs[best_epoch], 6) if best_epoch is not None
        else None,
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
        "uint8_batches": bool(getattr(data, "uint8", False)),
        **flops.utilisation(meter.flops_per_image, throughput, peak),
        "peak_tflops": peak, "peak_source": peak_source,
        "first_step_seconds": round(meter.first_step_seconds, 3)
        if meter.first_step_seconds is not None else None,
        "world_size": world,
        # what decides the last bits of every sum on a CPU, and so the figures: the same seed,
        # versions, threads and instruction set give the same numbers (README, Set up)
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **({"ddp": module.rank_check.result} if module.rank_check.result else {}),
        **({"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
           if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda" else {}),
        **parameter_counts(module.model),
        **({"ranked_checkpoints": kept} if (kept := ranked_checkpoints(trainer, run_dir)) else {}),
        **({"early_stopping": stopped} if (stopped := early_stop_summary(trainer)) else {}),
        **({"pruned": pruned} if (pruned := pruned_summary(trainer)) else {}),
        **({"ema": averaged} if (averaged := ema_summary(trainer)) else {}),
        **({"task": task.name, **finished} if task.name != DEFAULT_TASK else {}),
        **module.summary(data.class_names),
        "train_from": freeze.train_from,
        "lr": float(cfg.optim.lr),
        **(found or {}),  # what the finders found (lr_finder, batch_size_finder)
        "metric": cfg.metric,
        **({"feature_cache": cache_report} if cache_report else {}),
        **({"decode_cache": data.decode_info} if data.decode_info else {}),
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


SUMMARY_FILES = ("model.safetensors", "adapter.safetensors", "metrics.json", "load_report.json",
                 "manifest.json", "curves.png", "confusion_matrix.png", "report.html",
                 "checkpoints/")


def print_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    headline = task_of(metrics.get("task", DEFAULT_TASK)).headline
    best = metrics.get(f"best/{headline}")
    chosen = metrics.get("metric")  # the metric the run was told to watch comes first
    watched = (f"{chosen} {metrics[chosen]:.4f}; " if chosen != headline and isinstance(
        metrics.get(chosen), int | float) else "")
    value = metrics.get(headline)
    lines = [
        f"finetune: done in {metrics['train_seconds']:.1f} s over {metrics['epochs']} epochs; "
        f"{watched}{headline} {value if value is not None else float('nan'):.4f} "
        f"(best {best:.4f} at epoch "
        f"{metrics['best/epoch']})" if best is not None else
        f"finetune: done in {metrics['train_seconds']:.1f} s; no validation ran",
        f"  run dir: {run_dir}",
        *([f"  speed: {speed}"] if (speed := speed_line(metrics)) else []),
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
    for warning in reversed(metrics.get("warnings", [])):  # look before anyone uses it
        lines.insert(1, f"  warning: {warning}")
    pruned = metrics.get("pruned")
    if pruned:
        lines.insert(1, f"  pruned after epoch {pruned['epoch']} of {pruned['of']}: the study's "
                        f"pruner ({pruned['metric']} {pruned['value']}) ended this trial")
    print("\n".join(lines), flush=True)



def ranked_checkpoints(trainer: pl.Trainer, run_dir: Path) -> list[dict[str, Any]]:
    """The best checkpoints kept (checkpoint.keep=best/both/topK), best first: each file (in the
    run dir) and the value that ranked it."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_k_models:
            ranked = sorted(callback.best_k_models.items(), key=lambda item: float(item[1]),
                            reverse=callback.mode == "max")
            here = run_dir.resolve()
            return [{"file": Path(path).resolve().relative_to(here).as_posix(),
                     callback.monitor: round(float(value), 6)} for path, value in ranked
                    if Path(path).resolve().is_relative_to(here)]
    return []


def log_built(cfg: DictConfig, built: Built) -> None:
    ops = len(cfg.surgery)
    log.info("build: %s; head at %s; surgery: %d ops", cfg.model.name,
             ", ".join(built.head_paths) or "none", ops)
