"""Every extension table with its built-in entries and the installed plugins' entries.

Importing this module imports each table module (each fills its own table); `load()` then adds
the entry points of installed packages, once per process. Every command, `finetune.train`,
a sweep's job and a DDP rank call it before a choice is checked or a name is looked up, so an
extension installed with pip works everywhere without a fork (docs/extending.md). Torch-free.
"""

from __future__ import annotations

from typing import Any

from finetune.data import box_formats, mask_formats
from finetune.data import formats as data_formats
from finetune.errors import ConfigError
from finetune.extensions import TABLES, load_plugins
from finetune.models import sources as model_sources
from finetune.tasks import table as tasks
from finetune.training import bn_policies, loggers, schedules
from finetune.weights import sources as weight_sources

# The modules that own a table (imported above for the tables they fill).
TABLE_MODULES = (weight_sources, model_sources, data_formats, box_formats, mask_formats,
                 schedules, bn_policies, loggers, tasks)

_loaded: list[bool] = []


def load() -> None:
    """Add the installed plugins to the tables (once per process).

    Raises:
        ConfigError: a plugin that cannot be imported or clashes with an entry, one line each.
    """
    if _loaded:
        return
    problems = load_plugins()
    _loaded.append(True)
    if problems:
        raise ConfigError(problems)


def listing() -> list[dict[str, Any]]:
    """Each table's key, entry point group and entries, the plugins' marked with their source
    (`finetune inspect --plugins`)."""
    load()
    return [{"key": key, "group": table.group, "what": table.what,
             "entries": [{"name": name, "plugin": table.plugins.get(name)} for name in table]}
            for key, table in sorted(TABLES.items())]
