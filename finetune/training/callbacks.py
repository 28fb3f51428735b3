"""Callbacks: steady-state training throughput, time waiting on input, time to first step."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import EarlyStopping, WeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn

from finetune.rundir import artifacts
from finetune.rundir.artifacts import write_stream
from finetune.training.flops import step_flops

log = logging.getLogger("finetune")


class ThroughputMeter(pl.Callback):
    """Training images per second in steady state, the share of step time spent waiting for
    the next batch, the wall time of fit, and the time from launch to the first step.

    The first batch of every epoch (loader start-up) and the whole first epoch when there
    are more (allocator, kernel and compile warm-up) are left out; validation is never
    counted. On a GPU the clock is read after a synchronize at the start and the end of each
    epoch only, so measuring adds no per-step sync.
    """

    def __init__(self, launched: float | None = None) -> None:
        self.launched = launched  # wall-clock start of the command, for first_step_seconds
        self.epochs: list[tuple[int, float, float]] = []  # (images, seconds, waiting) per epoch
        self.fit_seconds = 0.0
        self.first_step_seconds: float | None = None
        self._start = self._epoch_start = self._last = 0.0
        self._images, self._waiting = 0, 0.0
        self._batch_end: float | None = None
        self.flops_per_image: float | None = None  # of a training step (flops.step_flops)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch_end = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        network = getattr(pl_module, "step_network", None)
        if self.flops_per_image is None and network is not None and isinstance(
                batch[0], torch.Tensor):  # counted once, on meta tensors: no compute
            self.flops_per_image = step_flops(network, batch[0])
        now = time.perf_counter()
        if self.first_step_seconds is None and self.launched is not None:
            self.first_step_seconds = time.time() - self.launched
        if self._batch_end is not None and batch_idx >= 1:
            self._waiting += now - self._batch_end

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        last = batch_idx == trainer.num_training_batches - 1
        if batch_idx == 0 or last:
            _sync(pl_module)  # the GPU has finished what the clock is about to count
        if batch_idx == 0:
            self._epoch_start, self._images, self._waiting = time.perf_counter(), 0, 0.0
        else:
            self._images += len(batch[1])
        self._last = self._batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Until the last training batch ended: validation and checkpoint writing, which
        # Lightning runs before this hook, are not training time.
        if self._images:
            self.epochs.append((self._images, self._last - self._epoch_start, self._waiting))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._start

    def _steady(self) -> list[tuple[int, float, float]]:
        return self.epochs[1:] or self.epochs

    @property
    def images_per_second(self) -> float | None:
        seconds = sum(s for _, s, _ in self._steady())
        return sum(n for n, _, _ in self._steady()) / seconds if seconds > 0 else None

    @property
    def input_wait_share(self) -> float | None:
        """Share of steady-state training time between one step's end and the next one's
        start: fetching the batch (decode, transforms, collation, the copy to the device)."""
        seconds = sum(s for _, s, _ in self._steady())
        return sum(w for _, _, w in self._steady()) / seconds if seconds > 0 else None


def _sync(module: pl.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): handled exactly like Ctrl-C."""


def stop_name(exception: BaseException) -> str:
    return "SIGTERM" if isinstance(exception, Terminated) else "Ctrl-C"


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM: a checkpoint of where training stood (checkpoints/interrupted.ckpt)
    and metrics.json saying so, before Lightning shuts down. Only for those: a run that
    failed (a NaN loss) must not save what failed."""

    def __init__(self, run_dir: Any, write_status: Any) -> None:
        self.run_dir, self.write_status = run_dir, write_status

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return

        path = self.run_dir / artifacts.CHECKPOINTS / artifacts.INTERRUPTED_CHECKPOINT
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            run = Path(self.run_dir).resolve()
            message = (f"stopped by {stop_name(exception)} in epoch {trainer.current_epoch} "
                       f"at step {trainer.global_step}; continue from that step with: python -m "
                       f"finetune rerun={run} resume={path.resolve()} (not bit-exact: a "
                       "mid-epoch restart cannot be); or from the end of the last whole epoch "
                       f"(checkpoints/last.ckpt, if one was written) with: python -m finetune "
                       f"rerun={run} resume={run} (bit-exact)")
            self.write_status(message, str(path))
            print(f"finetune: {message}", flush=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: a temporary file renamed into place, so an
    interrupted or failed save (a full disk) leaves the previous last.ckpt / best.ckpt whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        write_stream(Path(path), lambda handle: torch.save(checkpoint, handle))


class StopEarly(EarlyStopping):
    """Lightning's EarlyStopping (after each validation), with two changes: `mode=auto` is
    min for a loss and max otherwise, and on resume the configured patience is kept (the
    counter and best value come from the checkpoint; Lightning would restore the patience
    too, so a larger one could never continue a run that stopped)."""

    def __init__(self, monitor: str, patience: int, mode: str = "auto",
                 min_delta: float = 0.0) -> None:
        if mode == "auto":
            mode = "min" if monitor.endswith("loss") else "max"
        super().__init__(monitor=monitor, patience=patience, mode=mode, min_delta=min_delta,
                         check_on_train_epoch_end=False, strict=True, verbose=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    def summary(self) -> dict[str, Any] | None:
        """What metrics.json records when the run stopped early (None: it did not)."""
        if not self.stopped_epoch:
            return None
        return {"stopped_epoch": int(self.stopped_epoch), "monitor": self.monitor,
                "mode": self.mode, "patience": int(self.patience),
                "min_delta": float(abs(self.min_delta)), "best": round(float(self.best_score), 6)}


class EMA(WeightAveraging):
    """An exponential moving average of the weights (`model.ema`), on Lightning's
    WeightAveraging: after every optimizer step from epoch `start_epoch` on,
    ema = decay x ema + (1 - decay) x weights (BatchNorm statistics too; the first update
    copies the weights). Validation runs on the EMA weights, and at the end of training they
    become the model's, so model.safetensors, predict and export use them. Checkpoints hold
    both (Lightning's layout: the EMA as state_dict, the live weights as
    current_model_state), so a resume continues both exactly. Before the first update the
    live weights are validated and saved, not the untrained copy the average starts from."""

    def __init__(self, decay: float, start_epoch: int = 0) -> None:
        super().__init__(use_buffers=True, avg_fn=get_ema_avg_fn(decay))
        self.decay, self.start_epoch = decay, start_epoch
        self._epoch = 0

    def updates(self) -> int:
        return int(self._average_model.n_averaged) if self._average_model is not None else 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self._epoch >= self.start_epoch

    def on_validation_epoch_start(self, trainer: pl.Trainer,
                                  pl_module: pl.LightningModule) -> None:
        if self.updates():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer,
                                pl_module: pl.LightningModule) -> None:
        if self.updates():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.updates():
            super().on_train_end(trainer, pl_module)

    def summary(self) -> dict[str, Any]:
        """What the manifest and metrics.json record."""
        return {"decay": self.decay, "start_epoch": self.start_epoch, "updates": self.updates(),
                "weights": "ema" if self.updates() else "last (no EMA update happened)"}


class BestWeights(pl.Callback):
    """eval.checkpoint=best: a copy (on the CPU) of the weights at the validation with the
    best `monitor` (lower is better for a loss), for the test split's evaluation."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch: int | None = None
        self.value: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        lower = self.monitor.endswith("loss")
        if value != value or (self.value is not None and (
                value >= self.value if lower else value <= self.value)):
            return
        self.value, self.epoch = value, trainer.current_epoch
        self.state = {k: v.detach().cpu().clone()
                      for k, v in pl_module.model.state_dict().items()}


def progress_bar_on(wanted: bool) -> bool:
    """trainer.enable_progress_bar as the run applies it: the bar redraws one line with carriage
    returns, which reads well on a terminal (or in a notebook) and is hundreds of frames in a file
    (`> train.log 2>&1`, a batch job); there the run prints one line per epoch instead."""
    return wanted and (sys.stderr.isatty() or "ipykernel" in sys.modules)


class EpochLine(pl.Callback):
    """One line per epoch when the progress bar is off (a log file, a batch job): what a
    person watching would otherwise not see for minutes."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = {k: float(metrics[k]) for k in ("train/loss_epoch", "val/loss", "val/acc",
                                                "val/mAP", "val/map", "val/map_50")
                 if k in metrics}
        figures = ", ".join(f"{k.removesuffix('_epoch')} {v:.4g}" for k, v in shown.items())
        log.info("epoch %d of %d: %s (%.1f s)", trainer.current_epoch, trainer.max_epochs or 0,
                 figures or "no figures yet", time.perf_counter() - self.started)
