"""Writing and reading a run dir. Every file is written atomically (temporary file + rename)."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from finetune.compose import safe_files
from finetune.errors import FinetuneError

if TYPE_CHECKING:  # reading a run dir (report, recipes) imports no torch
    import torch
    from torch import nn

# Every file a run dir holds, named once.
METRICS = "metrics.json"  # status and final metrics; written last (complete) or on a stop
LOAD_REPORT = "load_report.json"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"  # adapter.type: the adapter and fully trained tensors alone
MANIFEST = "manifest.json"
METRICS_CSV = "metrics.csv"  # Lightning's CSV logger, one row per logged step / epoch
CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"
VAL_PREDICTIONS = "val_predictions.csv"
TEST_PREDICTIONS = "test_predictions.csv"  # the test split's, with confidences
EVALUATION = "evaluation.json"  # per class, calibration, wrong images: val and test splits
LR_FIND = "lr_find.png"  # optim.lr=auto: the learning-rate finder's curve
PR_CURVE = "pr_curve.png"  # a detector's precision-recall curves on the validation split
RELIABILITY = "reliability.png"  # the reliability diagram (test split when there is one)
REPORT = "report.html"  # the page a person opens (finetune/rundir/html_report.py)
BAD_IMAGES = "bad_images.csv"  # images skipped because they cannot be decoded
ERROR_FILE = "error.txt"  # the traceback of a run that failed on something other than input
CHECKPOINTS = "checkpoints"  # best.ckpt, last.ckpt, interrupted.ckpt
LAST_CHECKPOINT = "last.ckpt"
INTERRUPTED_CHECKPOINT = "interrupted.ckpt"

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
    refuse_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_signals():
        _write_stream(path, writer)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C or SIGTERM during a write takes effect once the file is whole: the handlers
    are swapped for ones that only note the signal (Python runs handlers in the main thread,
    between bytecodes, so a raise there would cut a checkpoint short mid-write)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught[:1]:  # now act on it, as the handler that was there would
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _write_stream(path: Path, writer: Callable[[BinaryIO], Any]) -> None:
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
                           "(resume=RUN_DIR continues a run from its last checkpoint)") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refuse_links(path: Path, levels: int = 0) -> None:
    """Refuse to write `path` when it, or one of the `levels` folders above it, is a symbolic
    link: a run dir that came from someone else may hold links planted to make our outputs
    land elsewhere (model.onnx -> ~/.bashrc). The rename would replace a link to a file
    rather than follow it; a linked folder would be followed."""
    for candidate in [path, *list(path.parents)[:levels]]:
        if candidate.is_symlink():
            raise FinetuneError(f"{candidate} is a symbolic link (to {os.readlink(candidate)}); "
                                "finetune does not write through links in a run dir, which may "
                                "have been planted by whoever sent it: remove the link, or "
                                "write somewhere else (output=PATH)")


LOCK = ".lock"


def lock_run_dir(run_dir: Path, wait: bool = False, name: str = LOCK) -> Any:
    """Hold the run dir for this process (an advisory lock on `run_dir/.lock`, released when
    the returned file is closed or the process ends); refused when another run holds it, so
    two runs never write one dir, whatever their dirs' names.

    Args:
        wait: wait for the other process instead of refusing.
        name: the lock file's name in `run_dir`.

    Raises:
        FinetuneError: another live process holds the dir (and `wait` is False).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    refuse_links(run_dir / name)
    handle = open(run_dir / name, "a+")  # noqa: SIM115 (held open for the whole run)
    try:  # lazy: POSIX only (fcntl); elsewhere the lock is the dir's suffix alone
        import fcntl
    except ImportError:  # Windows: no advisory locks; the dir names' suffix still applies
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        handle.close()
        raise FinetuneError(f"another run is writing to {run_dir} right now; wait for it to "
                            "end, or give this one its own dir (hydra.run.dir=...)") from None
    return handle


class DiskFull(FinetuneError):
    """The device is full: nothing was half-written."""


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or what it wraps: a database driver's error under SQLAlchemy's) says the
    device or the database is full."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFull) or (isinstance(current, OSError) and current.errno in
                                             (errno.ENOSPC, errno.EDQUOT)):
            return True
        if "database or disk is full" in str(current) or "No space left" in str(current):
            return True
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else (
            current.__cause__ or current.__context__)
    return False


# What a run dir holds before anything ran: Hydra's record and job log, the lock, a status.
BOOKKEEPING = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", LOCK, METRICS,
               "__main__.log", "finetune.log")


def remove_if_unused(run_dir: Path) -> bool:
    """Remove a run dir that holds only bookkeeping: a run refused before it trained leaves
    nothing behind. Only those files are deleted (never a tree), and the dir only when that
    leaves it empty, so a dir that held anything else keeps everything; its parent goes too
    when that leaves it empty (outputs/<recipe>/, and outputs/ then)."""
    if not run_dir.is_dir() or run_dir.is_symlink() or not (run_dir / ".hydra").is_dir():
        return False
    present = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if not p.is_dir()}
    if not present <= set(BOOKKEEPING) or any(p.is_symlink() for p in run_dir.rglob("*")):
        return False
    for name in present:
        (run_dir / name).unlink()
    try:
        (run_dir / ".hydra").rmdir()
        run_dir.rmdir()
    except OSError:  # something appeared meanwhile: leave the rest alone
        return False
    with contextlib.suppress(OSError):  # not empty: another run's dir is there
        run_dir.parent.rmdir()
        if run_dir.parent.parent.name == "outputs":  # outputs/<recipe>/<time>: the default
            run_dir.parent.parent.rmdir()
    return True


def link_if_identical(copy: Path, original: Path) -> bool:
    """Store two byte-identical files once: `copy` becomes a hard link to `original` (the
    run dir then holds its bytes once). False when they differ or either is missing."""
    if not (copy.is_file() and original.is_file()) or copy.is_symlink() or \
            original.is_symlink() or copy.stat().st_size != original.stat().st_size:
        return False
    if os.path.samefile(copy, original) or file_sha256(copy) != file_sha256(original):
        return os.path.samefile(copy, original)
    staged = copy.with_name(f".{copy.name}.link")
    staged.unlink(missing_ok=True)
    try:
        os.link(original, staged)
    except OSError:  # a file system without hard links: keep both files
        return False
    os.replace(staged, copy)
    return True


def finite_or_null(obj: Any) -> Any:
    """`obj` with every NaN and infinity replaced by None: JSON has no such numbers (Python
    writes a bare NaN, which other readers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (a non-finite number is written as null; whoever wrote it says why)."""
    text = json.dumps(finite_or_null(obj), indent=2, sort_keys=False, allow_nan=False)
    write_bytes(path, (text + "\n").encode())


# A cell a spreadsheet would read as a formula starts with one of these (OWASP's CSV
# injection rule); such a text is written with a leading ' so that it is shown, not run.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """`value` as a CSV cell a spreadsheet shows as text: a label such as `=HYPERLINK(...)` or
    `+cats` gets a leading `'`; numbers (and texts that are numbers, such as -0.5) stay."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Every CSV finetune writes (predictions, evaluations, bad images, leaderboards): each
    text cell safe to open in a spreadsheet (safe_cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([safe_cell(c) for c in header])
    writer.writerows([safe_cell(c) for c in row] for row in rows)
    write_bytes(path, buffer.getvalue().encode())


def read_json(path: Path, what: str = "file") -> Any:
    """A JSON file of a run dir, bounded; a corrupt one is one sentence (UnsafeFile)."""
    return safe_files.load_json(Path(path), what)


def save_weights(model: nn.Module, path: Path) -> str:
    """The state dict as safetensors (tensors only, no pickle); returns the file's sha256."""
    return save_tensors(model.state_dict(), path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Named tensors as safetensors (no pickle); returns the file's sha256."""
    # lazy: safetensors is slow to import; only this path needs it
    from safetensors.torch import save

    plain = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    write_bytes(path, save(plain))
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
