"""The feature cache: a frozen prefix computed once, the trained rest fed from its outputs.

When the first layers stay frozen for the whole run and every image is transformed the same
way each epoch, their output for an image never changes: computing it once and training the
rest of the network on the stored outputs gives the same model, with epochs that cost only
the trained part. `freeze.cache: auto | true | false`.

How the model is cut: torch.fx traces the forward with every module but `nn.Sequential` kept
whole (so a module's own forward, and its train/eval behaviour, run as written). The *prefix*
is every operation that depends only on the input and on frozen modules that are
deterministic in training; a frozen module with randomness or state in training (dropout,
BatchNorm in train mode under `freeze.bn=train`) runs every step, so the cut comes before it.
The prefix must hand exactly one tensor to the rest (the *suffix*), and the traced forward
must be the same in train and eval mode (not so with auxiliary classifiers); otherwise there
is no cache, and the reason is logged. The suffix shares its modules with the model:
training it trains the model; checkpoints and weights are the model's.

Where features live: in memory; in a sweep, also on disk under the sweep dir (or
`freeze.cache_dir`), keyed by a hash of the prefix (code, modules, tensors), the images and
their transform, the precision and the device type, so jobs that share all of these compute
the features once. Stored sets larger than `MEMORY_BYTES` are memory-mapped, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset

from finetune.compose import safe_files
from finetune.errors import FinetuneError
from finetune.locations import SPLITS_ENV, cache_dir
from finetune.rundir.artifacts import DiskFull, file_sha256, write_json, write_stream
from finetune.training.feature_cuts import (
    Cut,
    bottlenecks,
    cut_model,
    prefix_identity,
    segment,
    split_bottleneck,
    tensor_digests,
)

log = logging.getLogger("finetune")

MODES = ("auto", "true", "false")
MEMORY_BYTES = 2 * 2**30  # larger feature sets are memory-mapped from disk


def mode_of(setting: Any) -> str:
    """`freeze.cache` as one of auto / true / false (YAML may give a bool)."""
    text = str(setting).lower()
    if text not in MODES:
        raise FinetuneError(f"freeze.cache={setting!r}: use auto, true or false")
    return text


def config_conflicts(setting: Any, augment: list[Any], unfreeze: list[Any],
                     train_from: Any, modules: list[Any], adapter: bool = False) -> list[str]:
    """Why `freeze.cache=true` cannot hold for this config (empty: it may). An adapter
    freezes its base: the layers before the first adapted one are a prefix."""
    if str(setting).lower() != "true":
        return []
    problems = []
    if augment:
        problems.append("freeze.cache=true but data.augment is random: the frozen layers' "
                        "outputs differ every epoch, so they cannot be computed once; remove "
                        "the augmentation or use freeze.cache=auto (off here)")
    if unfreeze:
        problems.append(f"freeze.cache=true but freeze.unfreeze opens frozen layers at epoch "
                        f"{unfreeze[0]['epoch']}: their outputs change then; drop the phases "
                        "or use freeze.cache=auto (off here)")
    if train_from is None and not modules and not adapter:
        problems.append("freeze.cache=true but nothing is frozen (freeze.train_from is null): "
                        "there is no frozen prefix to cache; set freeze.train_from")
    return problems


# -- the stored features ---------------------------------------------------------------------


class CachedFeatures(Dataset):
    """The prefix's output for each image of a dataset, with the dataset's labels (and paths),
    indexed as the dataset is: by index, or (index, seed) from EpochShuffle."""

    def __init__(self, features: torch.Tensor | np.ndarray, source: Any) -> None:
        self.features, self.labels = features, source.labels
        self.paths = getattr(source, "paths", None)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i = key[0] if isinstance(key, tuple) else key
        row = self.features[i]
        if isinstance(row, np.ndarray):  # memory-mapped from disk
            row = torch.from_numpy(np.array(row))
        label = self.labels[i]  # a label set (task=multilabel) as a float tensor
        return row, torch.tensor(label, dtype=torch.float32) if isinstance(label, tuple) \
            else label


def data_identity(dataset: Any) -> dict[str, Any]:
    """What makes two datasets give the same prefix outputs: the images (file names, sizes
    and modification times, or the pixels of in-memory data), labels, and the transform."""
    digest = hashlib.sha256()
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        digest.update(images.contiguous().numpy().tobytes())
    else:
        for path in dataset.paths:
            stat = os.stat(path)
            digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                          .encode())
    digest.update(json.dumps([list(v) if isinstance(v, tuple) else int(v)
                              for v in dataset.labels]).encode())
    return {"items": digest.hexdigest(), "count": len(dataset.labels),
            "transform": repr(getattr(dataset, "described", dataset.transform))}


# -- nested cuts: a shallower split's features as the start of a deeper split's --------------



def swept_splits() -> list[str]:
    """The split points of the sweep this job is part of (none outside a sweep)."""
    try:
        splits = json.loads(os.environ.get(SPLITS_ENV, "[]"))
    except ValueError:
        return []
    return [s for s in splits if isinstance(s, str) and s not in ("null", "None")] \
        if isinstance(splits, list) else []


class FeatureCache(pl.Callback):
    """Computes the prefix's outputs when fit sets up and makes the module train the
    suffix on them. `directory`: where features are kept for reuse (None: memory only);
    `write`: whether this process writes them there (rank zero)."""

    def __init__(self, cut: Cut, directory: Path | None = None, write: bool = True,
                 splits: list[str] | None = None) -> None:
        self.cut, self.directory, self.write = cut, directory, write
        self.info: dict[str, Any] = {}
        # where the prefix can be cut again (its own end last); features are looked up at
        # each, deepest first, and stored at those of the sweep's other split points
        self.points = bottlenecks(cut.prefix) if cut is not None else []
        self.splits = swept_splits() if splits is None else splits

    def keep_also(self, prefix: fx.GraphModule) -> list[str]:
        """The bottlenecks that are the cuts of the sweep's other split points (stored on the
        way, for their jobs to start from), in order; only where features are kept."""
        if self.directory is None:
            return []
        found = {split_bottleneck(prefix, self.points, s) for s in self.splits}
        return [p for p in self.points if p in found]

    def _where(self, point: str) -> str:
        node = next(n for n in self.cut.prefix.graph.nodes if n.name == point)
        return str(node.target) if node.op == "call_module" else node.name

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before configure_optimizers, which builds the train loader (to count steps); the
        # model is moved to the device here, as Lightning does next.
        if stage != "fit":
            return
        data = trainer.datamodule
        started = time.perf_counter()
        device = trainer.strategy.root_device
        pl_module.to(device)
        prefix, end = self.cut.prefix, self.points[-1]
        digests = tensor_digests(prefix)  # each tensor and each split's images hashed once
        images = {"train": data_identity(data.train_set), "val": data_identity(data.val_set)}
        points = self.points if self.directory else [end]  # memory only: nothing to find
        keys = {p: self._key(trainer, images, device, segment(prefix, None, p), digests)
                for p in points}
        key = keys[end]
        start, stored = None, {}
        for point in reversed(points):  # the deepest cut whose features are stored
            found = {split: self._read(keys[point], split) for split in ("train", "val")}
            if all(v is not None for v in found.values()):
                start, stored = point, found
                break
        status = "reused" if start == end else "computed"
        wanted = [end] + [p for p in self.keep_also(prefix) if p != end and (
            start is None or self.points.index(p) > self.points.index(start))]
        sets = {}
        for split in ("train", "val"):
            dataset = getattr(data, f"{split}_set")
            if start == end:
                features = stored[split]
            else:
                with trainer.precision_plugin.forward_context():
                    computed = self.compute(
                        dataset if start is None else stored[split], device, start, wanted,
                        max(64, getattr(data, "batch_size", 64)), data.num_workers,
                        getattr(pl_module, "channels_last", False),
                        getattr(data, "on_device", None))
                for point in wanted[1:]:
                    self._keep(computed[point], keys[point], split)
                features = self._keep(computed[end], key, split)
            sets[split] = CachedFeatures(features, dataset)
        if start is not None and start != end:
            self.info["from"] = f"the stored output of {self._where(start)}"
        self.info["stored"] = [self._where(p) for p in wanted] \
            if self.directory and start != end else []
        data.train_set, data.val_set = sets["train"], sets["val"]
        data.num_workers = 0  # indexing memory: workers would only add copies
        data.on_device = None  # features, not uint8 images: nothing to normalize
        pl_module.use_features(self.cut.suffix)
        shape = list(sets["train"].features.shape[1:])
        size = sum(s.features.nbytes for s in sets.values())
        seconds = time.perf_counter() - started
        self.info.update({"status": status, "at": self.cut.boundary, "shape": shape,
                          "megabytes": round(size / 2**20, 2), "seconds": round(seconds, 3),
                          "key": key[:16], "path": str(self.directory) if self.directory
                          else None})
        log.info("feature cache: %s %s of %s per image (%d + %d images, %.1f MB) in %.1f s%s%s; "
                 "epochs train only what comes after", status, shape, self.cut.boundary,
                 len(sets["train"]), len(sets["val"]), size / 2**20, seconds,
                 f" from {self.info['from']}" if "from" in self.info else "",
                 f", kept in {self.directory}" if self.directory else "")

    def _key(self, trainer: pl.Trainer, images: dict[str, Any], device: torch.device,
             prefix: fx.GraphModule, digests: dict[str, str]) -> str:
        described = {"prefix": prefix_identity(prefix, digests), **images,
                     "precision": str(trainer.precision), "device": device.type,
                     "torch": torch.__version__}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    @torch.no_grad()
    def compute(self, source: Any, device: torch.device, start: str | None, wanted: list[str],
                batch_size: int, num_workers: int = 0, channels_last: bool = False,
                on_device: Any = None) -> dict[str, torch.Tensor]:
        """The features at each `wanted` bottleneck, from the images of a dataset (`start`
        None; uint8 images go through `on_device` once moved) or from stored features at
        `start`, in batches of the same size either way."""
        if start is None:
            batches = (images for images, _ in DataLoader(
                source, batch_size=batch_size, num_workers=num_workers,
                pin_memory=device.type == "cuda"))
        else:
            batches = (torch.as_tensor(np.array(source[i:i + batch_size]))
                       for i in range(0, len(source), batch_size))
        ends = sorted(wanted, key=self.points.index)
        stages, begin = [], start
        for point in ends:
            stages.append((point, segment(self.cut.prefix, begin, point)))
            begin = point
        chunks: dict[str, list[torch.Tensor]] = {p: [] for p in ends}
        for x in batches:
            x = x.to(device, non_blocking=True)
            if start is None and on_device is not None:
                x = on_device(x)
            if start is None and channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for point, stage in stages:
                x = stage(x)
                chunks[point].append(x.float().cpu())
        return {p: torch.cat(c).contiguous() for p, c in chunks.items()}

    def _file(self, key: str, split: str) -> Path | None:
        return self.directory / f"{key[:32]}-{split}.npy" if self.directory else None

    @staticmethod
    def _record(key: str, split: str) -> Path:
        """Where the sha256 of a stored feature file is kept: finetune's private cache, not
        the sweep dir, which may have arrived from someone else with planted features."""
        return cache_dir("feature_records") / f"{key[:32]}-{split}.json"

    def _read(self, key: str, split: str) -> torch.Tensor | np.ndarray | None:
        path = self._file(key, split)
        if path is None or not path.is_file():
            return None
        record = self._record(key, split)
        expected = (safe_files.load_json_object(record, "feature record").get("sha256")
                    if record.is_file() else None)
        if expected is None or file_sha256(path) != expected:
            log.warning("feature cache: %s was not written by a run of yours (or changed "
                        "since); computing the features again", path)
            return None
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.array(array)) if array.nbytes <= MEMORY_BYTES else array

    def _keep(self, features: torch.Tensor, key: str, split: str
              ) -> torch.Tensor | np.ndarray:
        path = self._file(key, split)
        if path is None or not self.write:
            return features
        # whole or absent (parallel jobs may race to write the same file: either one wins)
        try:
            write_stream(path, lambda handle: np.save(handle, features.numpy(),
                                                      allow_pickle=False))
            write_json(self._record(key, split), {"path": str(path.resolve()),
                                                  "sha256": file_sha256(path)})
        except DiskFull:
            log.warning("feature cache: no space left to store the %s features in %s; this "
                        "run keeps them in memory, later runs compute them again (free some "
                        "space there, or set freeze.cache=false)", split, path.parent)
            return features
        if features.nbytes > MEMORY_BYTES:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        return features


def decide(setting: Any, model: nn.Module, has_phases: bool, augment: bool,
           passes: float, mixes: bool = False) -> tuple[Cut | None, str]:
    """Whether this run caches: (the cut, or None; the reason, for the log and metrics.json).

    `passes`: how many times the training loop goes through the training set (epochs x the
    share of batches per epoch); `auto` caches only when that is more than once, i.e. when
    computing every image once saves work.
    """
    mode = mode_of(setting)
    if mode == "false":
        return None, "off (freeze.cache=false)"
    if augment:
        return None, "off: data.augment is random"
    if mixes:
        return None, "off: data.mix mixes the images of each batch"
    if has_phases:
        return None, "off: freeze.unfreeze changes the frozen part during the run"
    if not any(not p.requires_grad for p in model.parameters()):
        if mode == "true":
            raise FinetuneError("freeze.cache=true but nothing is frozen: there is no frozen "
                                "prefix to cache; set freeze.train_from")
        return None, "off: nothing is frozen"
    cut = cut_model(model)
    if isinstance(cut, str):
        if mode == "true":
            raise FinetuneError(f"freeze.cache=true but {cut}; use freeze.cache=auto or false")
        return None, f"off: {cut}"
    share = cut.frozen_share(model)
    if mode == "auto" and cut.stopped and share < 0.5:
        return None, (f"off: the cut is at {cut.boundary}, before {cut.stopped}; it would "
                      f"compute only {100 * share:.0f}% of the frozen parameters once "
                      "(freeze.cache=true forces it)")
    if mode == "auto" and passes <= 1:
        return None, (f"off: the run sees the training set {passes:.2f} times; computing "
                      "every image once would not save work (freeze.cache=true forces it)")
    return cut, f"on ({mode}): cut at {cut.boundary}" + (
        f", before {cut.stopped}" if cut.stopped else "")
