"""Reading YAML and JSON that may come from someone else: bounded, plain data, one sentence.

A recipe, a run dir's recorded config and a manifest are untrusted data. They are read with
YAML's safe loader (no Python tags: `!!python/object` is refused), within a size limit, and
their node graph is measured *before* it is built, so an alias bomb (`&a [*a, *a, ...]`
nested) or a recursive alias is refused instead of filling the memory. Every failure is a
FinetuneError naming the file and what is wrong. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import yaml
from omegaconf._utils import get_yaml_loader

from finetune.errors import FinetuneError

MAX_YAML_BYTES = 1 << 20  # a recipe is a page of text; 1 MiB is far past any real one
MAX_JSON_BYTES = 64 << 20  # a manifest holds the config and the class names
MAX_NODES = 100_000  # values after every alias is expanded
# Values aliases may add beyond those written out: each value costs about a millisecond to
# build and check (OmegaConf), so aliases never cost more than building an empty recipe.
MAX_ALIAS_VALUES = 128
MAX_INFLATION = 2  # a torch zip's members may hold at most this times the file's bytes
MAX_DEPTH = 64  # nesting of mappings and lists


class UnsafeFile(FinetuneError):
    """A file that cannot be read as the plain data it should hold."""


def _loader() -> type:
    """OmegaConf's YAML loader (safe, duplicate keys refused, its float rules), so a recipe
    reads here exactly as OmegaConf.load would read it."""
    try:
        return get_yaml_loader()
    except ImportError:  # a later omegaconf moved it: YAML's own safe loader
        return yaml.SafeLoader


def read_text(path: Path, limit: int, what: str) -> str:
    """The file's text, refused when it is not a regular file or larger than `limit` bytes."""
    path = Path(path)
    if not path.is_file():
        raise UnsafeFile(f"{what} {path}: not a regular file")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFile(f"{what} {path}: larger than {limit // (1 << 10)} KiB; it cannot be "
                         "a real one (truncate it or check where it came from)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UnsafeFile(f"{what} {path}: not UTF-8 text (byte {err.start})") from None


def _expanded_size(node: yaml.Node, where: str) -> int:
    """Values the node graph becomes once aliases are expanded; refused past the limits."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(current: yaml.Node, depth: int) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UnsafeFile(f"{where}: a YAML alias refers to itself (a recursive value); "
                             "recipes hold plain, finite data")
        if depth > MAX_DEPTH:
            raise UnsafeFile(f"{where}: nested deeper than {MAX_DEPTH} levels; recipes are "
                             "a few levels deep")
        active.add(key)
        total = 1
        if isinstance(current, yaml.MappingNode):
            for k, v in current.value:
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > MAX_NODES:
                    break
        elif isinstance(current, yaml.SequenceNode):
            for v in current.value:
                total += size(v, depth + 1)
                if total > MAX_NODES:
                    break
        active.discard(key)
        if total > MAX_NODES:
            raise UnsafeFile(f"{where}: expands to more than {MAX_NODES:,} values (YAML "
                             "aliases repeat what they point to); refused before it is built")
        sizes[key] = total
        return total

    total = size(node, 0)
    added = total - len(sizes)  # each node once: what the text itself holds
    if added > MAX_ALIAS_VALUES:
        raise UnsafeFile(f"{where}: its YAML aliases add {added:,} values to the {len(sizes):,} "
                         f"it writes out (at most {MAX_ALIAS_VALUES} may be added that way); "
                         "write the values out, or repeat less")
    return total


def inflation_problem(path: Path, what: str) -> str | None:
    """Why the zip-based torch file at `path` may not be read: its members would inflate far
    past the file's own size (torch writes them stored, uncompressed; a deflated member
    holding zeros turns kilobytes into gigabytes in memory). None: it may be read.

    Raises:
        zipfile.BadZipFile: a zip whose directory cannot be read (damaged): the caller says
            the file cannot be read, as for any other damage.
    """
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None  # not a zip (torch's legacy format stores its bytes as they are)
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except Exception as err:  # a damaged directory raises almost any type; such a file is
        # not read (torch's own reader might take what this one cannot measure)
        raise zipfile.BadZipFile(f"a damaged zip file ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:120]})") from None
    size = path.stat().st_size
    if inflated <= MAX_INFLATION * size + (1 << 20):
        return None
    return (f"{what} {path} would inflate from {size:,} bytes to {inflated:,} in memory "
            f"(more than {MAX_INFLATION}x; torch saves tensors uncompressed): it was made to "
            "exhaust memory, or repacked; use the file as torch.save wrote it")


def load_yaml(path: Path, what: str = "recipe") -> Any:
    """Plain data (dicts, lists, str, int, float, bool, None) from a YAML file.

    Raises:
        UnsafeFile: too large, not UTF-8, not valid YAML, a Python or unknown tag, an alias
            bomb, a recursive alias, or nested too deep, each as one sentence.
    """
    text = read_text(path, MAX_YAML_BYTES, what)
    where = f"{what} {path}"
    loader = _loader()(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _expanded_size(root, where)
        return loader.construct_document(root)
    except UnsafeFile:
        raise
    except yaml.YAMLError as err:
        raise UnsafeFile(f"{where}: not valid YAML, or a tag recipes may not use (only plain "
                         f"values, lists and mappings): {' '.join(str(err).split())}") from None
    except RecursionError:
        raise UnsafeFile(f"{where}: nested too deeply to read") from None
    finally:
        loader.dispose()


def load_json(path: Path, what: str = "manifest") -> Any:
    """Plain data from a JSON file we wrote, refused in one sentence when it is not.

    NaN and Infinity, which Python's json writes but JSON does not allow, read as NaN/inf
    (metrics of a run that diverged); everything else must be strict JSON.
    """
    text = read_text(path, MAX_JSON_BYTES, what)
    try:
        return json.loads(text, parse_constant=lambda c: {"NaN": math.nan,
                                                          "Infinity": math.inf,
                                                          "-Infinity": -math.inf}[c])
    except (ValueError, KeyError) as err:
        raise UnsafeFile(f"{what} {path}: not valid JSON ({' '.join(str(err).split())[:160]}); "
                         "it is truncated or was changed: take it again from the run") from None
    except RecursionError:
        raise UnsafeFile(f"{what} {path}: nested too deeply to read") from None


def load_json_object(path: Path, what: str = "manifest") -> dict[str, Any]:
    """`load_json`, refused unless the file holds an object (a mapping of keys)."""
    data = load_json(path, what)
    if not isinstance(data, dict):
        raise UnsafeFile(f"{what} {path}: holds a JSON {type(data).__name__}, not an object; "
                         "it was changed after the run")
    return data
