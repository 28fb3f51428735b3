"""Weight sources -> a tensor dict; key mapping; loading by name and shape; the load report."""

from __future__ import annotations

import logging
import pickle
import re
import urllib.error
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from finetune import backbones
from finetune.artifacts import file_sha256
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

# Wrappers that prefix every key: DataParallel/DDP, torch.compile, a Lightning module.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class LoadReport:
    """What a weight load did, key by key."""

    source: str
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_skipped: list[dict[str, Any]] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def new(self) -> list[str]:
        """Model tensors left newly initialized: missing or shape-skipped."""
        return self.missing + [s["key"] for s in self.shape_skipped]

    def summary(self) -> str:
        total = len(self.loaded) + len(self.new)
        if self.source == "none":
            return f"no pretrained weights: all {total} tensors newly initialized"
        new = ", ".join(self.new[:6]) + (f", ... ({len(self.new)} in all)"
                                          if len(self.new) > 6 else "")
        line = f"loaded {len(self.loaded)}/{total} tensors from {self.source}"
        line += f"; new: {new}" if self.new else ""
        return line + (f"; unused: {len(self.unexpected)}" if self.unexpected else "")

    def to_dict(self) -> dict[str, Any]:
        counts = {name: len(getattr(self, name)) for name in
                  ("loaded", "missing", "unexpected", "shape_skipped", "renamed")}
        return {**asdict(self), "counts": counts, "summary": self.summary()}


def hub_path(url: str) -> Path:
    """Where torch.hub caches `url`: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def read_torchvision(model_name: str, weights_name: str) -> tuple[dict[str, torch.Tensor],
                                                                  LoadReport]:
    """Tensors of a torchvision weights entry, through its own API and TORCH_HOME cache."""
    entry = backbones.weights_enum(model_name, weights_name)
    path = hub_path(entry.url)
    try:
        tensors = entry.get_state_dict(progress=True, check_hash=True, weights_only=True,
                                       map_location="cpu")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise FinetuneError(
            f"weights {model_name}/{entry.name}: cannot download {entry.url} ({reason}); "
            f"offline? download that file on a machine with internet and put it at {path} "
            "(torch's hub cache; set TORCH_HOME to move it)") from None
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError) as err:
        raise _unreadable(path, err) from None
    report = LoadReport(source="torchvision", path=str(path), url=entry.url,
                        sha256=file_sha256(path))
    fixed = {}
    for key, tensor in tensors.items():
        new_key = key
        for pattern, repl in backbones.key_fixes(model_name):
            new_key = re.sub(pattern, repl, new_key)
        if new_key != key:
            report.renamed[key] = new_key
        fixed[new_key] = tensor
    return fixed, report


def read_file(path_str: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A state dict saved with torch.save (.pth / .pt / .pkl), read with weights_only=True."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FinetuneError(f"weights.path={path_str!r}: no such file; give the path of a "
                            "state dict (.pth / .pt / .pkl)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(f"weights.path={path_str!r}: not a state dict (a mapping of names "
                            "to tensors); save one with torch.save(model.state_dict(), path)")
    return obj, LoadReport(source="file", path=str(path.resolve()), sha256=file_sha256(path))


def _unreadable(path: Path, err: Exception) -> FinetuneError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return FinetuneError(
        f"weights file {path} cannot be read as a weights-only state dict ({first}); if it is "
        "truncated or corrupt, delete it and download it again; if it holds a pickled model "
        "object, convert it to a state dict once, in a trusted place")


def strip_wrappers(tensors: dict[str, torch.Tensor], model_keys: set[str],
                   report: LoadReport) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (module. / _orig_mod. / model.) that the model's keys lack."""
    out = dict(tensors)
    for prefix in WRAPPER_PREFIXES:
        keys = list(out)
        if keys and all(k.startswith(prefix) for k in keys) and not any(
                k.startswith(prefix) for k in model_keys):
            out = {k[len(prefix):]: v for k, v in out.items()}
            report.renamed.update({f"{prefix}{k}": k for k in out})
    return out


def load_matching(model: nn.Module, tensors: dict[str, torch.Tensor], report: LoadReport,
                  on_shape_mismatch: str = "skip") -> LoadReport:
    """Copy every tensor whose name and shape match the model; record everything else."""
    target = model.state_dict()
    matched: OrderedDict[str, torch.Tensor] = OrderedDict()
    # Modules read their version from the state dict's metadata (mnasnet refuses to load
    # without it); keep the checkpoint's, or the model's own when a filtered dict lost it.
    matched._metadata = getattr(tensors, "_metadata", None) or target._metadata  # type: ignore[attr-defined]
    for key, value in target.items():
        if key not in tensors:
            # Checkpoints older than BatchNorm's counter lack it; a fresh counter is benign.
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
        elif tensors[key].shape != value.shape:
            report.shape_skipped.append({"key": key, "checkpoint_shape": list(tensors[key].shape),
                                         "model_shape": list(value.shape)})
        else:
            matched[key] = tensors[key]
            report.loaded.append(key)
    report.unexpected = sorted(set(tensors) - set(target))
    if report.shape_skipped and on_shape_mismatch == "error":
        first = report.shape_skipped[0]
        raise FinetuneError(
            f"weights: {len(report.shape_skipped)} tensors differ in shape, e.g. {first['key']} "
            f"{first['checkpoint_shape']} in the checkpoint vs {first['model_shape']} in the "
            "model; set weights.on_shape_mismatch=skip to leave them newly initialized")
    model.load_state_dict(matched, strict=False)
    return report


def check_min_loaded(report: LoadReport, model: nn.Module, head_paths: list[str],
                     min_loaded: float) -> None:
    """Fail when fewer than `min_loaded` of the non-head tensors came from the checkpoint."""
    body = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")
            and not any(k.startswith(f"{h}.") for h in head_paths)]
    loaded = len(set(body) & set(report.loaded))
    if body and loaded / len(body) < min_loaded:
        example = (report.unexpected or ["(none)"])[0]
        raise FinetuneError(
            f"weights: only {loaded} of {len(body)} backbone tensors matched the checkpoint "
            f"{report.path} (weights.min_loaded={min_loaded}); is it for another architecture? "
            f"checkpoint keys look like {example!r}, model keys like {body[0]!r}")


def load_weights(model: nn.Module, cfg: Any, model_name: str, head_paths: list[str]
                 ) -> LoadReport:
    """Load `cfg` (the weights group) into `model` and report what happened."""
    if cfg.source == "none":
        return LoadReport(source="none", missing=[k for k in model.state_dict()
                                                  if not k.endswith("num_batches_tracked")])
    if cfg.source == "torchvision":
        tensors, report = read_torchvision(model_name, cfg.name)
    else:
        tensors, report = read_file(cfg.path)
    if cfg.strip_prefix == "auto":
        tensors = strip_wrappers(tensors, set(model.state_dict()), report)
    load_matching(model, tensors, report, cfg.on_shape_mismatch)
    check_min_loaded(report, model, head_paths, cfg.min_loaded)
    log.info("weights: %s", report.summary())
    return report
