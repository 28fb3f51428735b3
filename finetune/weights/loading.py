"""Key mapping, loading by name and shape, and the checks on a weight load.

The same for every source (finetune.sources): wrapper prefixes, `weights.rename` regexes,
`weights.exclude` globs and the surgery's moves map checkpoint keys to model keys; then every
tensor whose name and shape match is copied, and the report says what happened to the rest.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from finetune.errors import FinetuneError
from finetune.weights.load_report import LoadReport
from finetune.weights.readers import SourceNotTrained
from finetune.weights.sources import read_source

log = logging.getLogger("finetune")

# Wrappers that prefix every key: DataParallel/DDP, torch.compile, a Lightning module.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _renamed(tensors: dict[str, torch.Tensor], fn: Callable[[str], str], report: LoadReport
             ) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        new = fn(key)
        if new != key:
            report.renamed[report_key(report, key)] = new
        out[new] = value
    return out


def report_key(report: LoadReport, key: str) -> str:
    """The key's name in the checkpoint, following earlier renames back."""
    back = {new: old for old, new in report.renamed.items()}
    return back.get(key, key)


def strip_prefixes(tensors: dict[str, torch.Tensor], setting: str, model_keys: set[str],
                   report: LoadReport) -> dict[str, torch.Tensor]:
    """`auto`: drop wrapper prefixes the model lacks; `none`: keep keys; else that prefix."""
    if setting == "none":
        return tensors
    prefixes = WRAPPER_PREFIXES if setting == "auto" else (setting,)
    for prefix in prefixes:
        keys = list(tensors)
        if setting != "auto" and not any(k.startswith(prefix) for k in keys):
            raise FinetuneError(f"weights.strip_prefix={prefix!r} matches no checkpoint key; "
                                f"keys look like {keys[0]!r}")
        if keys and all(k.startswith(prefix) for k in keys) and not any(
                k.startswith(prefix) for k in model_keys):
            tensors = _renamed(tensors, lambda k, p=prefix: k[len(p):], report)
    return tensors


def map_keys(tensors: dict[str, torch.Tensor], cfg: Any, model_keys: set[str],
             report: LoadReport, surgery_map: Callable[[str], str] | None = None
             ) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> model keys: prefixes, renames, excludes, then the surgery's moves."""
    tensors = strip_prefixes(dict(tensors), cfg.strip_prefix, model_keys, report)
    for pattern, repl in dict(cfg.rename).items():
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise FinetuneError(f"weights.rename: {pattern!r} is not a regex ({err})") from None
        tensors = _renamed(tensors, lambda k, r=regex, s=repl: r.sub(s, k), report)
    for key in [k for k in tensors if any(fnmatch.fnmatchcase(k, g) for g in cfg.exclude)]:
        report.excluded.append(key)
        del tensors[key]
    if surgery_map is not None:
        tensors = _renamed(tensors, surgery_map, report)
    return tensors


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv kernel for another number of input channels, keeping activation scale:
    1 channel sums the RGB kernels; more channels repeat them, scaled by 3 / channels."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / weight.shape[1])
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def _first_conv_key(model: nn.Module, target: dict[str, torch.Tensor]) -> str | None:
    """The input conv's kernel: the one a timm model's pretrained config names, else the
    first 4-D weight."""
    named = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(named, str) and f"{named}.weight" in target:
        return f"{named}.weight"
    return next((k for k, v in target.items() if v.dim() == 4 and k.endswith("weight")), None)


POS_EMBED_NAMES = ("pos_embed", "pos_embedding")  # timm's ViTs, torchvision's encoder


def prefix_tokens(model: nn.Module, key: str, old: int, new: int) -> int | None:
    """How many tokens (class, distillation, register) lead a position embedding of `old`
    tokens in the checkpoint and `new` in the model, the rest a square grid in both: the
    model's own count where it says (timm's num_prefix_tokens, no_embed_class), else the
    fewest that make both grids square. None: not a square grid."""
    holder = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
    declared = getattr(holder, "num_prefix_tokens", None)
    if isinstance(declared, int):
        counts = [0 if getattr(holder, "no_embed_class", False) else declared]
    else:
        counts = list(range(0, 9))
    for count in counts:
        a, b = old - count, new - count
        if a > 0 and b > 0 and math.isqrt(a) ** 2 == a and math.isqrt(b) ** 2 == b:
            return count
    return None


def resample_pos_embed(posemb: torch.Tensor, new_tokens: int, prefix: int) -> torch.Tensor:
    """A position embedding [1, prefix + h*w, dim] for another square grid, as timm's
    resample_abs_pos_embed does it: the prefix tokens kept, the grid resized bicubically
    (antialiased), in float32."""
    old_side = math.isqrt(posemb.shape[1] - prefix)
    new_side = math.isqrt(new_tokens - prefix)
    head, grid = posemb[:, :prefix], posemb[:, prefix:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic",
                                           antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat([head, grid], dim=1)


def _adapt(model: nn.Module, key: str, source: torch.Tensor, value: torch.Tensor,
           first_conv: str | None) -> tuple[torch.Tensor, str] | None:
    """A checkpoint tensor reshaped for the model where the meaning allows: the input conv
    for other input channels, a ViT's position embedding for another image size."""
    if (key == first_conv and source.dim() == 4 and source.shape[0] == value.shape[0]
            and source.shape[2:] == value.shape[2:]):
        how = "summed" if value.shape[1] == 1 else "repeated and scaled"
        return (adapt_input_conv(source, value.shape[1]),
                f"input channels {source.shape[1]} -> {value.shape[1]} ({how})")
    if (key.rpartition(".")[2] in POS_EMBED_NAMES and source.dim() == value.dim() == 3
            and source.shape[0] == value.shape[0] == 1 and source.shape[2] == value.shape[2]):
        prefix = prefix_tokens(model, key, source.shape[1], value.shape[1])
        if prefix is not None:
            old, new = (math.isqrt(n - prefix) for n in (source.shape[1], value.shape[1]))
            return (resample_pos_embed(source, value.shape[1], prefix),
                    f"position embedding resampled {old}x{old} -> {new}x{new} (bicubic)")
    return None


def load_matching(model: nn.Module, tensors: dict[str, torch.Tensor], report: LoadReport,
                  on_shape_mismatch: str = "skip") -> LoadReport:
    """Copy every tensor whose name and shape match the model, adapt the input conv and a
    ViT's position embedding where only their size differs; record everything else."""
    target = model.state_dict()
    first_conv = _first_conv_key(model, target)
    matched: OrderedDict[str, torch.Tensor] = OrderedDict()
    # Modules read their version from the state dict's metadata (mnasnet refuses to load
    # without it); keep the checkpoint's, or the model's own when a filtered dict lost it.
    matched._metadata = getattr(tensors, "_metadata", None) or target._metadata  # type: ignore[attr-defined]
    for key, value in target.items():
        if key not in tensors:
            # Checkpoints older than BatchNorm's counter lack it; a fresh counter is benign.
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
            continue
        source = tensors[key]
        adapted = None if source.shape == value.shape else _adapt(model, key, source, value,
                                                                  first_conv)
        if source.shape == value.shape:
            matched[key] = source
            report.loaded.append(key)
        elif adapted is not None:
            matched[key] = adapted[0]
            report.loaded.append(key)
            report.adapted.append({"key": key, "checkpoint_shape": list(source.shape),
                                   "model_shape": list(value.shape), "how": adapted[1]})
        else:
            report.shape_skipped.append({"key": key, "checkpoint_shape": list(source.shape),
                                         "model_shape": list(value.shape)})
    report.unexpected = sorted(set(tensors) - set(target))
    if report.shape_skipped and on_shape_mismatch == "error":
        first = report.shape_skipped[0]
        raise FinetuneError(
            f"weights: {len(report.shape_skipped)} tensors differ in shape, e.g. {first['key']} "
            f"{first['checkpoint_shape']} in the checkpoint vs {first['model_shape']} in the "
            "model; set weights.on_shape_mismatch=skip to leave them newly initialized")
    model.load_state_dict(matched, strict=False)
    return report


def _common_prefix_hint(keys: list[str], model_keys: set[str]) -> str:
    firsts = {k.split(".", 1)[0] for k in keys}
    if len(firsts) == 1 and not any(k.startswith(f"{next(iter(firsts))}.") for k in model_keys):
        prefix = f"{next(iter(firsts))}."
        return f"; every checkpoint key starts with {prefix!r}: set weights.strip_prefix={prefix}"
    return ""


def check_min_loaded(report: LoadReport, model: nn.Module, head_paths: list[str],
                     min_loaded: float, checkpoint_keys: list[str]) -> None:
    """Fail when fewer than `min_loaded` of the non-head tensors came from the checkpoint."""
    model_keys = set(model.state_dict())
    body = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")
            and not any(k.startswith(f"{h}.") for h in head_paths)]
    loaded = len(set(body) & set(report.loaded))
    if body and loaded / len(body) < min_loaded:
        example = (report.unexpected or ["(none)"])[0]
        raise FinetuneError(
            f"weights: only {loaded} of {len(body)} backbone tensors matched the checkpoint "
            f"{report.path or report.url} (weights.min_loaded={min_loaded}); checkpoint keys "
            f"look like {example!r}, model keys like {body[0]!r}"
            f"{_common_prefix_hint(checkpoint_keys, model_keys)}; is it for another "
            "architecture?")


def check_finite(model: nn.Module, report: LoadReport) -> None:
    """Refuse loaded tensors that hold NaN or infinity (weights or BatchNorm statistics): a
    run from them trains to a NaN val/loss, or stops at its first step."""
    state = model.state_dict()
    bad = [k for k in report.loaded if state[k].is_floating_point()
           and not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise FinetuneError(
            f"weights: {len(bad)} of the {len(report.loaded)} loaded tensors hold NaN or "
            f"infinity, e.g. {', '.join(bad[:3])} ({report.path or report.url or report.source})"
            "; the file is damaged or comes from a run that diverged: use another, or leave "
            "them out with weights.exclude")


def check_require(report: LoadReport, model: nn.Module, require: list[str]) -> None:
    """Every model tensor under the `weights.require` globs must have loaded."""
    keys = list(model.state_dict())
    loaded = set(report.loaded)
    for pattern in require:
        matching = [k for k in keys if fnmatch.fnmatchcase(k, pattern)
                    and not k.endswith("num_batches_tracked")]
        if not matching:
            raise FinetuneError(f"weights.require: {pattern!r} matches no model tensor; keys "
                                f"look like {keys[0]!r}")
        absent = [k for k in matching if k not in loaded]
        if absent:
            skipped = {s["key"]: s for s in report.shape_skipped}
            shown = [f"{k} (shape {skipped[k]['checkpoint_shape']} vs "
                     f"{skipped[k]['model_shape']})" if k in skipped else f"{k} (not in the "
                     "checkpoint)" for k in absent[:3]]
            raise FinetuneError(f"weights.require: {len(absent)} of {len(matching)} tensors "
                                f"under {pattern!r} did not load, e.g. {', '.join(shown)}")


def load_weights(model: nn.Module, cfg: Any, model_name: str, head_paths: list[str],
                 surgery_map: Callable[[str], str] | None = None,
                 class_names: list[str] | None = None, train_sources: bool = True
                 ) -> LoadReport:
    """Load `cfg` (the weights group) into `model` and report what happened; stops before
    training when too little loaded (`min_loaded`) or a required tensor did not (`require`).

    Args:
        class_names: this run's classes. A run or recipe source trained on other classes
            keeps its classifier to itself: the new head stays newly initialized.
    """
    if cfg.source == "none":
        return LoadReport(source="none", missing=[k for k in model.state_dict()
                                                  if not k.endswith("num_batches_tracked")])
    raw, report = read_source(cfg, model_name, train_sources)
    model_keys = set(model.state_dict())
    tensors = map_keys(raw, cfg, model_keys, report, surgery_map)
    source_classes = (report.run or {}).get("class_names")
    if head_paths and source_classes is not None and source_classes != class_names:
        # Same shape, other meaning: a head for the source's classes is no start for ours.
        for key in [k for k in tensors if any(k.startswith(f"{h}.") for h in head_paths)]:
            report.excluded.append(key)
            del tensors[key]
        report.head_reset = (f"the source was trained on classes {source_classes}, this run on "
                             f"{class_names}: the head starts new")
    load_matching(model, tensors, report, cfg.on_shape_mismatch)
    check_finite(model, report)
    log.info("%s", report.table())
    check_min_loaded(report, model, head_paths, cfg.min_loaded, list(raw))
    check_require(report, model, list(cfg.require))
    return report


def load_for_plan(model: nn.Module, cfg: Any, model_name: str, head_paths: list[str],
                  surgery_map: Callable[[str], str] | None, class_names: list[str] | None,
                  load: bool, train_sources: bool, notes: list[str]) -> LoadReport:
    """load_weights as a plan does it: `load` False checks the config only (nothing read); a
    recipe source not trained yet, where the plan may not train it (inspect), is a note in
    `notes` and the model keeps its random start."""
    weights = cfg if load else OmegaConf.merge(cfg, {"source": "none"})
    try:
        return load_weights(model, weights, model_name, head_paths, surgery_map, class_names,
                            train_sources)
    except SourceNotTrained as err:
        notes.append(str(err))
        return load_weights(model, OmegaConf.merge(cfg, {"source": "none"}), model_name,
                            head_paths)
