"""The extension axes: one `Table` per config key whose value names an entry (a weight source, a
data format, a task, ...), and the plugins that add entries from outside the package.

A table module makes its table here (`SOURCES = Table("weights.source", ...)`) and adds its
built-in entries; the schema reads the choices of a key from `TABLES`, so this module is the
bottom of the house and imports nothing of finetune's. A third-party package adds an entry by
declaring an entry point in the table's group (`finetune.weight_sources = mirror =
mypkg.weights:Mirror`); `load_plugins` (called by `finetune.plugins.load`, which every command
and run calls before a choice is checked) imports them. A plugin is code the user installed,
so it is trusted; a recipe can only name what is installed. Torch-free.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, distributions
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError


class Table(dict):
    """Name -> entry for one config key; entries are objects with a `name`."""

    def __init__(self, key: str, group: str, what: str) -> None:
        super().__init__()
        self.key, self.group, self.what = key, group, what
        self.plugins: dict[str, str] = {}  # name -> the entry point that added it
        if key in TABLES:
            raise RuntimeError(f"two tables for {key}: {TABLES[key].group} and {group}")
        TABLES[key] = self

    def add(self, *entries: Any) -> None:
        """Add built-in entries (each by its `name`)."""
        for entry in entries:
            if entry.name in self:
                raise RuntimeError(f"{self.key}: two entries named {entry.name!r}")
            self[entry.name] = entry


# config key -> its table, filled as the table modules are imported (finetune.plugins imports
# them all).
TABLES: dict[str, Table] = {}


def entry_from(point: EntryPoint) -> Any:
    """The table entry an entry point names: an instance, or a class made with no argument."""
    try:
        obj = point.load()
    except Exception as err:  # a broken plugin is the user's to fix: say which one
        raise FinetuneError(f"plugin {point.name} ({point.value}, entry point group "
                            f"{point.group}) cannot be imported: {type(err).__name__}: {err}; "
                            "fix or uninstall its package") from None
    return obj() if isinstance(obj, type) else obj


def installed_entry_points() -> list[EntryPoint]:
    """The entry points of the installed distributions, each distribution once (the first
    found on sys.path, as importlib does) — none from the working directory: `python -m`
    puts it first on sys.path, and a folder received from someone else (a data set, a run
    dir) must not be able to plant a `*.dist-info` whose plugin would then be imported."""
    here = Path.cwd().resolve()
    paths = [p for p in sys.path if p and Path(p).resolve() != here]
    found: dict[str, list[EntryPoint]] = {}
    for dist in distributions(path=paths):
        found.setdefault(dist.metadata["Name"] or "", list(dist.entry_points))
    return [point for points in found.values() for point in points]


def load_plugins() -> list[str]:
    """Add every installed entry point of every table's group; returns the problems found (a
    name taken twice, an entry whose `name` differs from its entry point's)."""
    problems: list[str] = []
    points = installed_entry_points()
    for table in TABLES.values():
        for point in (p for p in points if p.group == table.group):
            if point.name in table.plugins:
                continue  # loaded already (a second call, or the same distribution twice)
            if point.name in table:
                problems.append(f"plugin {point.value} (entry point group {table.group}) "
                                f"names {table.key}={point.name}, which finetune already has; "
                                "rename the entry point")
                continue
            entry = entry_from(point)
            if getattr(entry, "name", point.name) != point.name:
                problems.append(f"plugin {point.value}: its name is {entry.name!r} but its "
                                f"entry point is {point.name!r}; make them the same")
                continue
            if not getattr(entry, "name", ""):
                entry.name = point.name
            table[point.name] = entry
            table.plugins[point.name] = point.value
    return problems
