"""The gate for everything untrusted: what a received recipe or run dir may say, allowed by name.

A recipe, each of its `extends:` bases, a run dir's recorded config (`rerun=`, and the
manifest that `predict`, `export` and `weights.source: run` read), each entry of
`weights.recipe_overrides` and every sweep parameter pass `recipe_problems` /
`override_problems` before Hydra composes anything or any module is imported. Deny by
default: only these pass.

- keys of finetune's own schema (finetune/compose/schema.py), with their types and choices;
- `defaults` entries that pick an option of finetune's config groups (data, logger, sweep,
  hydra/launcher, hydra/sweeper), and `_self_`;
- `extends` and `description`;
- the Hydra keys in HYDRA_KEYS: the search (sweep parameters over schema keys, with plain
  values or sweep grammar), its size, and the run / sweep dir as a relative path with no `..`.

Everything else is refused with one sentence naming the key and why. Command-line overrides
typed by the person running the command are theirs, and are not gated here; a recipe never
supplies a flag. Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, OverrideType

from finetune import locations
from finetune.compose import allowlist, override_checks, schema
from finetune.models.sources import BUILDER_LOADS, builder_loads_problem
from finetune.sweeps.study import SAMPLERS

# Keys a received file may not set: the person at the command line must. Each with why.
CLI_ONLY = {
    "freeze.cache_dir": "it names a folder outside the run dir where features are written and "
                        "that later runs read back",
    "sweep.storage": "it names the database a sweep connects to and writes its trials in "
                     "(an SQLite URL is a file anywhere)",
    "sweep.trial": "the sweeper sets it for each job",
    "data.follow_links": "it lets a data folder or CSV list show files from elsewhere on this "
                         "machine (through links or ../ paths) in the run's report and CSVs",
}
# Top-level keys of a recipe file that are not schema keys.
RECIPE_EXTRAS = ("defaults", "extends", "description", "hydra")
# Options a recipe's defaults list may pick, per group (finetune's own groups are files).
HYDRA_GROUP_OPTIONS = {"hydra/sweeper": ("basic", "finetune_optuna")}
# Interpolations a value may hold: a reference to a schema key, nothing that calls a resolver
# (`${oc.env:SECRET}` would copy the environment into a shared run dir).
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w]*(?:\.[\w]+)*)\}")
# Hydra values the run and sweep dirs may use, besides plain text.
_DIR_INTERPOLATIONS = re.compile(
    r"\$\{(now:[^{}$]*|hydra\.job\.num|hydra\.job\.name|hydra\.runtime\.choices\.recipe"
    r"|run_suffix:)\}")
# What a `${now:FORMAT}` may hold: strftime directives that print digits, names or AM/PM
# (never %c, %D, %x, %n ...: they print '/', spaces or new lines) and safe characters.
_NOW_DIRECTIVE = re.compile(r"%[aAbBdHIjmMpSUwWyYfGuVz%]")
_NOW_TEXT = re.compile(r"[A-Za-z0-9_.,:+-]*")
_NAME = re.compile(r"^[A-Za-z0-9_.,-]{1,64}$")  # a partition or study name: no spaces, no lines


def _positive_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else "a whole number above 0"


def _count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "a whole number, 0 or more"


def _int_or_reference(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, str) and _REFERENCE.fullmatch(value):
        return None
    return "a whole number (or a reference such as ${seed})"


def _direction(value: Any) -> str | None:
    values = value if isinstance(value, list) else [value]
    ok = values and all(v in ("minimize", "maximize") for v in values)
    return None if ok else "minimize or maximize"


def _name(value: Any) -> str | None:
    ok = isinstance(value, str) and _NAME.match(value)
    return None if ok else "a short name of letters, digits, '_', '.', ',' and '-'"


def relative_dir(value: Any) -> str | None:
    """Why `value` may not be a run or sweep dir from a recipe (None: it may)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return "a relative path"
    text = str(value)
    formats = [m.group(1)[4:] for m in _DIR_INTERPOLATIONS.finditer(text)
               if m.group(1).startswith("now:")]
    for fmt in formats:
        if not _NOW_TEXT.fullmatch(_NOW_DIRECTIVE.sub("", fmt)):
            return ("a relative path whose ${now:...} formats hold only strftime's date and "
                    "time directives (%Y %m %d %H %M %S ...) and letters, digits, _ . , : + -")
    # each interpolation as what it prints: a date's own text stays (${now:..} is `..`)
    plain = _DIR_INTERPOLATIONS.sub(
        lambda m: _NOW_DIRECTIVE.sub("0", m.group(1)[4:]) if m.group(1).startswith("now:")
        else "x", text)
    if "$" in plain or "{" in plain:
        return ("a relative path whose only interpolations are ${now:...}, ${hydra.job.num}, "
                "${hydra.job.name} and ${hydra.runtime.choices.recipe}")
    parts = re.split(r"[/\\]", plain)
    if plain.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", plain) or ".." in parts:
        return "a relative path inside the working directory (no leading /, ~ or ..)"
    return None


# The Hydra keys a recipe may set, each with the check its value must pass. The search space
# (hydra.sweeper.params) is checked entry by entry, as overrides of schema keys.
HYDRA_KEYS: dict[str, Callable[[Any], str | None]] = {
    "hydra.run.dir": relative_dir,
    "hydra.sweep.dir": relative_dir,
    "hydra.sweep.subdir": relative_dir,
    "hydra.sweeper.n_trials": _positive_int,
    "hydra.sweeper.n_jobs": _positive_int,
    "hydra.sweeper.direction": _direction,
    "hydra.sweeper.sampler.name": lambda v: None if v in SAMPLERS
    else f"{', '.join(SAMPLERS[:-1])} or {SAMPLERS[-1]}",
    "hydra.sweeper.sampler.seed": _int_or_reference,
    "hydra.launcher.n_jobs": _positive_int,
    "hydra.launcher.timeout_min": _positive_int,
    "hydra.launcher.nodes": _positive_int,
    "hydra.launcher.tasks_per_node": _positive_int,
    "hydra.launcher.gpus_per_node": _count,
    "hydra.launcher.cpus_per_task": _positive_int,
    "hydra.launcher.mem_gb": _positive_int,
    "hydra.launcher.partition": _name,
}
SWEEP_PARAMS = "hydra.sweeper.params"
ENQUEUE = "hydra.sweeper.enqueue"  # trials to run first: a list of {schema key: plain value}


def interpolation_problems(node: Any, where: str, path: str = "") -> list[str]:
    """Every string that interpolates something other than a schema key (a resolver call
    such as ${oc.env:...}, a nested or partial interpolation)."""
    problems: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            problems += interpolation_problems(value, where, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems += interpolation_problems(value, where, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node:
        rest = _REFERENCE.sub("", node)
        refs = _REFERENCE.findall(node)
        bad = [r for r in refs if schema.check_key(r, "") is not None]
        if "${" in rest or bad:
            problems.append(f"{where}: {path}={node!r}: a received file may interpolate only "
                            "schema keys (such as ${data.image_size}), never a resolver or "
                            "another value")
    return problems


# Mappings whose keys may hold dots: override keys (the search, queued trials) and names the
# user's data or weights choose (a class, a tensor-name prefix).
_DOTTED_KEYS_ALLOWED = re.compile(
    r"^(hydra\.sweeper\.params|hydra\.sweeper\.enqueue\[\d+\]|weights\.rename"
    r"|data\.limit_per_class)$")


def _named_keys(node: Any, where: str, problems: list[str], path: str = "") -> Any:
    """`node` without the keys a file may not hold, each refused into `problems`: keys must be
    plain names (YAML allows numbers, lists, null as keys), without dots (OmegaConf keeps
    `"model.kwargs.x": v` as one literal key where a check would read it as nested, so a file
    has one key model: nested mappings). The rest is returned to be checked too."""
    if isinstance(node, list):
        return [_named_keys(v, where, problems, f"{path}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    kept = {}
    for key, value in node.items():
        if not isinstance(key, str):
            problems.append(f"{where}: {path or 'the top level'} has the key {key!r}; keys "
                            "are names")
        elif "." in key and not _DOTTED_KEYS_ALLOWED.match(path):
            nested = "".join(f"{part}: {{" for part in key.split(".")[:-1])
            nested += f"{key.split('.')[-1]}: ...{'}' * key.count('.')}"
            problems.append(f"{where}: {path or 'the top level'} has the dotted key "
                            f"{key!r}; write it nested ({nested}), one name per level")
        else:
            kept[key] = _named_keys(value, where, problems, f"{path}.{key}" if path else key)
    return kept


def defaults_problems(defaults: Any, where: str) -> list[str]:
    """A recipe's defaults list may pick options of finetune's config groups, and `_self_`."""
    if defaults is None:
        return []
    if not isinstance(defaults, list):
        return [f"{where}: defaults must be a list of group: option entries"]
    groups = {g: _options(g) for g in (*schema.GROUPS, "hydra/launcher")}
    groups.update(HYDRA_GROUP_OPTIONS)
    problems = []
    for entry in defaults:
        if entry == "_self_":
            continue
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(f"{where}: defaults entry {entry!r}: write group: option (e.g. "
                            "override /data: imagefolder)")
            continue
        key, value = next(iter(entry.items()))
        group = str(key).removeprefix("override").strip().lstrip("/")
        options = groups.get(group)
        if options is None:
            problems.append(f"{where}: defaults entry {key}: a recipe may choose only the "
                            f"groups {', '.join(sorted(groups))}, not {group!r}")
        elif not isinstance(value, str) or value not in options:
            problems.append(f"{where}: defaults entry {key}: {value!r} is not an option of "
                            f"{group} ({', '.join(options)})")
    return problems


def _options(group: str) -> tuple[str, ...]:
    """The shipped options of a config group (its YAML files under conf/)."""
    found = tuple(sorted(p.stem for p in (locations.CONF_DIR / group).glob("*.yaml")))
    return ("basic", *found) if group == "hydra/launcher" else found


def hydra_problems(hydra: Any, where: str) -> list[str]:
    """A recipe's `hydra:` block: only HYDRA_KEYS and the sweep parameters."""
    if hydra is None:
        return []
    if not isinstance(hydra, dict):
        return [f"{where}: hydra must be a mapping"]
    problems: list[str] = []

    def walk(node: Any, path: str) -> None:
        if path == SWEEP_PARAMS:
            problems.extend(sweep_params_problems(node, where))
            return
        if path == ENQUEUE:
            problems.extend(enqueue_problems(node, where))
            return
        if path in HYDRA_KEYS:
            why = HYDRA_KEYS[path](node)
            if why:
                problems.append(f"{where}: {path}={node!r}: must be {why}")
            return
        inner = [k for k in (*HYDRA_KEYS, SWEEP_PARAMS, ENQUEUE) if k.startswith(f"{path}.")]
        if isinstance(node, dict) and inner:
            for key, value in node.items():
                walk(value, f"{path}.{key}")
            return
        problems.append(f"{where}: {path} cannot be set in a received recipe or run dir (it "
                        "could run code or write outside the run dir); a recipe may set only "
                        "hydra.run.dir, hydra.sweep.dir/subdir, hydra.sweeper.params and the "
                        "search's size (docs/security.md lists them); set others on the "
                        "command line if you mean it")

    walk(hydra, "hydra")
    return problems


def sweep_params_problems(params: Any, where: str) -> list[str]:
    """hydra.sweeper.params from a recipe: schema keys, each swept over plain values."""
    if not isinstance(params, dict):
        return [f"{where}: {SWEEP_PARAMS} must map schema keys to their values, e.g. "
                "freeze.train_from: layer3,layer4"]
    problems = []
    for key, value in params.items():
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            problems.append(f"{where}: {SWEEP_PARAMS}.{key}: give the values as one string, "
                            "e.g. a,b,c or choice(a,b) or interval(0.1, 1.0)")
            continue
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) \
            else str(value)
        problems += override_problems(f"{key}={text}", f"{where}: {SWEEP_PARAMS}.{key}",
                                      sweep=True)
    return problems


def enqueue_problems(entries: Any, where: str) -> list[str]:
    """hydra.sweeper.enqueue from a recipe: trials, each a mapping of schema keys to plain
    values (checked as the overrides they become)."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return [f"{where}: {ENQUEUE} must be a list of trials, each a mapping of schema keys to "
                "values, e.g. [{optim.lr: 0.01, freeze.train_from: layer4}]"]
    problems = []
    for i, entry in enumerate(entries):
        for key, value in entry.items():
            if not isinstance(value, (str, int, float, bool)) and value is not None:
                problems.append(f"{where}: {ENQUEUE}[{i}].{key}: give one plain value")
                continue
            text = "null" if value is None else str(value).lower() \
                if isinstance(value, bool) else str(value)
            problems += override_problems(f"{key}={text}", f"{where}: {ENQUEUE}[{i}].{key}")
    return problems


def _check_schema_value(key: str, value: Any, where: str, probe: Any) -> list[str]:
    """One schema key's value from a received file: type, choices, imports, interpolations,
    command-line-only keys, and (for weights.recipe_overrides) each entry as an override."""
    if key in CLI_ONLY and value not in (None, False):
        return [f"{where}: {key} cannot be set in a received recipe or run dir ({CLI_ONLY[key]}); "
                "set it on the command line if you mean it"]
    model = schema.nest(key, value).get("model", {})  # model.kwargs.x=v and model={...} too
    model = model if isinstance(model, dict) else {}
    detector = model.get("detector") if isinstance(model.get("detector"), dict) else {}
    for path, kwargs in (("model.kwargs", model.get("kwargs")),
                         ("model.detector.kwargs", detector.get("kwargs"))):
        if isinstance(kwargs, dict) and set(kwargs) & set(BUILDER_LOADS):
            return [f"{where}: " + builder_loads_problem(
                sorted(set(kwargs) & set(BUILDER_LOADS))[0], path)]
    problems = allowlist.import_problems(schema.nest(key, value), where)
    problems += interpolation_problems(value, where, key)
    if problems:
        return problems
    problem = schema.check_value(key, value, where, probe)
    if problem:
        return [problem]
    if key == "weights.recipe_overrides" and isinstance(value, list):
        for i, entry in enumerate(value):
            problems += override_problems(entry, f"{where}: weights.recipe_overrides[{i}]")
    return problems


def recipe_problems(body: Any, where: str) -> list[str]:
    """Every reason a received recipe (or recorded config) may not be used, one line each.

    Args:
        body: the file as plain data (safe_files.load_yaml), before `extends` is merged.
        where: the file, for the messages.
    """
    if body is None:
        return []
    if not isinstance(body, dict):
        return [f"{where}: a recipe must be a mapping of keys, got {type(body).__name__}"]
    problems: list[str] = []
    body = _named_keys(body, where, problems)  # the rest is checked too: every problem at once
    problems += defaults_problems(body.pop("defaults", None), where)
    problems += hydra_problems(body.pop("hydra", None), where)
    for key in ("extends", "description"):  # read as plain text, never by OmegaConf
        if key in body and not isinstance(body[key], str):
            problems.append(f"{where}: {key} must be a string")
        elif key in body and "${" in body[key]:
            problems.append(f"{where}: {key}={body[key]!r}: plain text only; an "
                            "interpolation is never resolved here")
        body.pop(key, None)
    if body.get("head") in ("none", None) and "head" in body:
        body["head"] = {"type": "none"}  # `head: none` is short for head.type: none
    probe = None
    for key, value in schema.flatten(body):
        problem = schema.check_key(key, where)
        if problem:
            problems.append(problem)
            continue
        probe = probe if probe is not None else schema.new_probe()
        problems += _check_schema_value(key, value, where, probe)
    return problems


def override_problems(text: Any, where: str, sweep: bool = False) -> list[str]:
    """Why `text`, an override that came from a received file (a recipe_overrides entry, a
    sweep parameter), may not be passed on; [] when it may.

    It must be one `key=value` over a schema key or a finetune config group: never a flag
    (`--...`), a hydra key, a recipe or rerun switch, or an addition or deletion (`+`, `~`).
    """

    if not isinstance(text, str):
        return [f"{where}: {text!r} must be one key=value string"]
    if text.lstrip().startswith("-"):
        return [f"{where}: {text!r} is a command-line flag; a received file gives only "
                "key=value overrides of schema keys"]
    try:
        override = OverridesParser.create().parse_override(text)
    except Exception as err:
        return [f"{where}: {text!r} is not a key=value override ({' '.join(str(err).split())})"]
    key = override.key_or_group
    if override.type != OverrideType.CHANGE or override.package:
        return [f"{where}: {text!r}: a received file may only change schema keys (no +, ++, ~ "
                "or @package)"]
    if key.startswith("hydra") or key in ("recipe", "rerun"):
        return [f"{where}: {text!r}: {key} cannot be set from a received file; only schema "
                "keys and finetune's config groups"]
    if override.is_sweep_override() and not sweep:
        return [f"{where}: {text!r} is a sweep; give one value"]
    if key in schema.GROUPS:
        options = _options(key)
        values = override_checks.override_values(override)
        if values is None:
            return [f"{where}: {text!r}: {override_checks.GLOB_PROBLEM}"]
        return [f"{where}: {text!r}: {v!r} is not an option of {key} ({', '.join(options)})"
                for v in values if not isinstance(v, str) or v not in options]
    problem = schema.check_key(key, where)
    if problem:
        return [problem]
    value = override._value
    if isinstance(value, IntervalSweep):
        bounds = [value.start, value.end]
        if not all(isinstance(b, (int, float)) for b in bounds):
            return [f"{where}: {text!r}: interval bounds must be numbers"]
        values = bounds
    else:
        values = override_checks.override_values(override)
        if values is None:
            return [f"{where}: {text!r}: {override_checks.GLOB_PROBLEM}"]
    probe = schema.new_probe()
    problems: list[str] = []
    for one in values:
        problems += _check_schema_value(key, one, where, probe)
        if problems:
            break
    return problems


def manifest_model_problems(manifest: dict[str, Any], where: str) -> list[str]:
    """What predict, export and `weights.source: run` rebuild from a received manifest: the
    model name and builder arguments, the head and the surgery, gated like a recipe."""
    model = manifest.get("model")
    head = manifest.get("head")
    if not isinstance(model, dict) or not isinstance(head, dict):
        return [f"{where}: the manifest has no model and head description; it was changed "
                "after the run"]
    kwargs = model.get("build_kwargs") or {}
    # a detector on a classifier records the classifier's builder arguments inside its own
    # (`classifier`): both are gated, so neither can make a builder load or fetch anything
    inner = kwargs.get("classifier") if isinstance(kwargs, dict) else None
    outer = {k: v for k, v in kwargs.items() if k != "classifier"} if isinstance(
        inner, dict) else None
    body: dict[str, Any] = {
        "model": {"name": model.get("name"), "kwargs": inner if outer is not None else kwargs,
                  "source": model.get("source") or "torchvision"},
        "head": {k: head[k] for k in ("type", "num_classes", "dropout", "hidden") if k in head},
        "surgery": manifest.get("surgery") or [],
    }
    problems = recipe_problems(body, where)
    if outer is not None:
        problems += recipe_problems({"model": {"detector": {"kwargs": outer}}}, where)
    return problems
