"""The command line's overrides checked against the schema before Hydra composes them: every
unknown key, wrong type, bad choice and unknown group option, one line each.

Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import OmegaConf

from finetune.compose import allowlist
from finetune.compose.schema import GROUPS, Config, check_key, check_value, nest
from finetune.errors import did_you_mean
from finetune.locations import CONF_DIR

GLOB_PROBLEM = ("glob() picks among a config group's options and is not taken here; list "
                "the values (a,b,c or choice(a,b,c))")


def override_values(override: Any) -> list[Any] | None:
    """The values an override sets (each value of a sweep); None for a glob(), which only
    Hydra's config loader can expand."""
    if not override.is_sweep_override():
        return [override.value()]
    if isinstance(override._value, Glob):
        return None
    return list(override.sweep_iterator())


def _unclosed(override: str) -> bool:
    """Whether the value opens more brackets than it closes (outside quotes)."""
    depth, quote = 0, ""
    for char in override.partition("=")[2]:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
    return depth > 0


def check_overrides(overrides: list[str]) -> list[str]:
    """Every unknown key, wrong type, bad choice or unknown group option in CLI overrides."""

    errors: list[str] = []
    probe = None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        cut = [o for o in overrides if _unclosed(o)]
        if cut:  # `key={8: 18}` unquoted: the shell split it at the space
            shown = cut[0].lstrip("+")
            return [f"command line: {shown!r} is cut short: the shell splits a value at its "
                    f"spaces; put the whole override in quotes ('{shown} ...') or write it "
                    "without spaces"]
        return [f"command line: {' '.join(str(err).split())}"]
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or key == "recipe" or override.is_delete():
            continue
        where = f"override '{override.input_line}'"
        values = override_values(override)
        if values is None:
            if key not in GROUPS:
                errors.append(f"{where}: {GLOB_PROBLEM}")
            continue
        nested = [allowlist.import_problems(nest(key, v), where) for v in values]
        if any(nested):
            errors += next(n for n in nested if n)
            continue
        if key in GROUPS:
            options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            errors += [f"{where}: no {key} option '{v}'{did_you_mean(v, options)}; options: "
                       f"{', '.join(options)}" for v in values if str(v) not in options]
            continue
        problem = check_key(key, where)
        if problem:
            errors.append(problem)
            continue
        for value in values:
            probe = probe if probe is not None else OmegaConf.structured(Config)
            problem = check_value(key, value, where, probe)
            if problem:
                errors.append(problem)
                break
    return errors
