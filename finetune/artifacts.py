"""Writing and reading a run dir. Every file is written atomically (temporary file + rename)."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from safetensors.torch import save
from torch import nn

from finetune.errors import FinetuneError

METRICS = "metrics.json"
LOAD_REPORT = "load_report.json"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"

_UMASK = os.umask(0)
os.umask(_UMASK)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    write_stream(path, lambda handle: handle.write(data))


def write_stream(path: Path, writer: Callable[[BinaryIO], Any]) -> None:
    """Call `writer` on a temporary file beside `path`, then rename it into place: a crash or
    a full disk leaves the previous file whole, never a half-written one (and no temporary).

    Raises:
        DiskFull: no space (or quota) left on the device.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the device while writing {path}; "
                           f"{'the previous file is intact; ' if path.exists() else ''}free "
                           "some space (or point hydra.run.dir elsewhere) and run again "
                           "(resume=auto continues from the last checkpoint)") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiskFull(FinetuneError):
    """The device is full: nothing was half-written."""


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_bytes(path, buffer.getvalue().encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_weights(model: nn.Module, path: Path) -> str:
    """The state dict as safetensors (tensors only, no pickle); returns the file's sha256."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    write_bytes(path, save(tensors))
    return file_sha256(path)


def library_versions() -> dict[str, str]:
    names = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "hydra-core",
             "omegaconf", "safetensors", "finetune")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def open_run(run_dir: str | Path, key: str = "run") -> tuple[dict[str, Any], Path]:
    """The manifest of a finished run dir and its weights file, checked against each other.

    Args:
        key: the argument the run dir came from, for the error message.
    """
    run = Path(run_dir).expanduser()
    manifest_file, weights_file = run / MANIFEST, run / WEIGHTS
    if not manifest_file.is_file() or not weights_file.is_file():
        raise FinetuneError(f"{key}={str(run_dir)!r}: not a finished run dir (it needs "
                            f"{MANIFEST} and {WEIGHTS})")
    manifest = read_json(manifest_file)
    if manifest.get("model_sha256") != file_sha256(weights_file):
        raise FinetuneError(f"{key}={str(run_dir)!r}: {WEIGHTS} does not match the sha256 in "
                            "its manifest; the run dir was changed after the run")
    return manifest, weights_file


def epoch_metrics(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """metric -> {epoch: value} from Lightning's metrics.csv (its rows are sparse)."""
    out: dict[str, dict[int, float]] = {}
    if not metrics_csv.is_file():
        return out
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    out.setdefault(key, {})[epoch] = float(value)
    return out


def metrics_history(source: Path, last_epoch: int) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a metrics.csv up to `last_epoch`: what a resumed run's log starts
    with, without the rows of an epoch that was cut short. The header is sorted, as
    Lightning's CSV logger writes it; ([], []) when there is no such file."""
    if not source.is_file():
        return [], []
    with open(source, newline="") as handle:
        reader = csv.DictReader(handle)
        header = sorted(reader.fieldnames or [])
        rows = [[row.get(k, "") for k in header] for row in reader
                if row.get("epoch") and int(float(row["epoch"])) <= last_epoch]
    return header, rows
