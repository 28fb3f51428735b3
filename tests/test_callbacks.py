"""The throughput meter under a real Trainer: steady state leaves the warm-up epoch out, and
time spent waiting for data shows as the input-wait share."""

from __future__ import annotations

import time

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.training.callbacks import ThroughputMeter


class SlowImages(Dataset):
    """Each item takes `delay` seconds to 'decode' (and the first epoch's items much longer:
    a warm-up a steady-state rate must not include)."""

    def __init__(self, delay: float) -> None:
        self.delay, self.epoch = delay, 0

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.delay * (8 if self.epoch == 0 else 1))
        return torch.randn(4), index % 2


class Tiny(pl.LightningModule):
    def __init__(self, data: SlowImages) -> None:
        super().__init__()
        self.layer, self.data = torch.nn.Linear(4, 2), data

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def on_train_epoch_end(self) -> None:
        self.data.epoch += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_meter_measures_steady_state_and_input_waiting(tmp_path) -> None:
    data = SlowImages(delay=0.01)
    meter = ThroughputMeter()
    trainer = pl.Trainer(max_epochs=3, callbacks=[meter], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         accelerator="cpu")
    trainer.fit(Tiny(data), DataLoader(data, batch_size=4))
    assert [n for n, _, _ in meter.epochs] == [12, 12, 12]  # the first batch of each left out
    steady = sum(n for n, _, _ in meter.epochs[1:]) / sum(s for _, s, _ in meter.epochs[1:])
    everything = sum(n for n, _, _ in meter.epochs) / sum(s for _, s, _ in meter.epochs)
    assert meter.images_per_second == pytest.approx(steady)
    assert everything < 0.5 * steady  # the warm-up epoch is 8x slower: it must not count
    # the step is a 4x2 Linear; nearly all of an epoch is waiting for the next batch
    assert meter.input_wait_share > 0.5
