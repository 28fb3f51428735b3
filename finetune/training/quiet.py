"""Output a person reads: finetune's own lines, the progress bar and the summary.

Third-party messages that say nothing about this run are filtered here, at their source, each
with the reason; everything else is kept. `log_level=debug` keeps them all (and Lightning's
model summary). The filters hold for one run (`quiet_output` is a context manager), so a
Python session that calls finetune.train keeps its own warning settings.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# (message regex, why it does not apply to a finetune run)
FILTERED_WARNINGS: list[tuple[str, str]] = [
    (r"Experiment logs directory .* exists and is not empty",
     "the run dir is ours and new (it holds .hydra/ and metrics.json already); a resumed run "
     "carries its metrics.csv history on purpose"),
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning's own call into torch's pytree API; nothing a user can change"),
    (r"Found \d+ module\(s\) in eval mode at the start of training",
     "frozen BatchNorm layers are kept in eval mode on purpose (freeze.bn=frozen/affine; the "
     "plan line says how many)"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval",
     "metrics.csv gets every epoch's values regardless; short runs are the norm in tests and "
     "few-shot runs"),
    (r"The dirpath has changed from",
     "a run resumed into a new run dir ranks its best checkpoints among the epochs trained "
     "there (the resume line says so); last.ckpt, what a resume reads, is unaffected"),
    (r"You are trying to `self.log\(\)` but the `self.trainer` reference is not registered",
     "only raised for steps run outside a Trainer (a module used directly)"),
]

# Lightning's INFO lines (GPU/TPU available, the litlogger tip, `limit_*_batches` echoes, "Loading
# train_dataloader to estimate...", "`Trainer.fit` stopped"): the plan and summary lines say
# what matters (the device is in the trainer line). Its warnings stay.
LIGHTNING_INFO_LOGGERS = ("pytorch_lightning.utilities.rank_zero",
                          "lightning_fabric.utilities.rank_zero",
                          "lightning.pytorch.utilities.rank_zero")


# huggingface_hub's warning on each failed request ("... thrown while requesting HEAD ..."):
# when the file cannot be had, finetune's own sentence names the repo, the file and where to
# place it; when a retry succeeds there is nothing to say.
# faster-coco-eval's INFO lines (COCO's evaluation table and timings at every validation,
# through torchmetrics' mAP): the epoch line and metrics.json carry the figures.
ERROR_ONLY_LOGGERS = ("huggingface_hub.utils._http", "faster_coco_eval")


# matplotlib's "building the font cache; this may take a moment" (its first run on a machine,
# logged from a timer thread while the run trains): a one-off of the plotting library, not the run.
FONT_CACHE_LOGGER = "matplotlib.font_manager"


def _not_font_cache(record: logging.LogRecord) -> bool:
    return "building the font cache" not in record.getMessage()


# Lightning's "`weights_only` was not set, defaulting to `False`." when its learning-rate finder
# saves the model before its range test (optim.lr=auto): a file of its own, restored and
# deleted at once; nothing to set.
CHECKPOINT_LOGGER = "pytorch_lightning.trainer.connectors.checkpoint_connector"


def _not_weights_only_echo(record: logging.LogRecord) -> bool:
    return "`weights_only` was not set" not in record.getMessage()


@contextlib.contextmanager
def quiet_output(level: str = "info") -> Iterator[None]:
    """Filter the third-party noise for the duration of a run (`level`: info | debug)."""
    if level == "debug":
        yield
        return
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    hub = [logging.getLogger(name) for name in ERROR_ONLY_LOGGERS]
    levels = [logger.level for logger in loggers + hub]
    fonts = logging.getLogger(FONT_CACHE_LOGGER)
    fonts.addFilter(_not_font_cache)
    saving = logging.getLogger(CHECKPOINT_LOGGER)
    saving.addFilter(_not_weights_only_echo)
    with warnings.catch_warnings():
        for pattern, _why in FILTERED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        for logger in hub:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, old in zip(loggers + hub, levels, strict=True):
                logger.setLevel(old)
            fonts.removeFilter(_not_font_cache)
            saving.removeFilter(_not_weights_only_echo)


class TerminalFormatter(logging.Formatter):
    """What a person reads on the terminal: `finetune: message` (`finetune: warning: ...` for
    a warning or worse); the run's log file keeps the full `[time][name][LEVEL] - message`
    format (conf/config.yaml, hydra.job_logging)."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = f"{record.name}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text
