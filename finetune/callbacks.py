"""Callbacks: steady-state training throughput."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class ThroughputMeter(pl.Callback):
    """Training images per second in steady state, and the wall time of fit.

    The first batch of every epoch (loader start-up) and the whole first epoch when there
    are more (allocator and kernel warm-up) are left out; validation is never counted.
    """

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []  # (images, seconds) per epoch
        self.fit_seconds = 0.0
        self._start = self._epoch_start = self._last = 0.0
        self._images = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if batch_idx == 0:
            self._epoch_start, self._images = now, 0
        else:
            self._images += len(batch[1])
        self._last = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._images:
            self.epochs.append((self._images, self._last - self._epoch_start))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._start

    @property
    def images_per_second(self) -> float | None:
        steady = self.epochs[1:] or self.epochs
        seconds = sum(s for _, s in steady)
        return sum(n for n, _ in steady) / seconds if seconds > 0 else None
