"""`finetune inspect recipe=NAME_OR_PATH [key=value ...] [--keys] [--splits] [--json]`
(or `model.source=timm model.name='convnext*'` / `--list`: the models that match)

Everything a run would do, without training: the resolved config, the module tree after
surgery (parameters, trainable / frozen, BatchNorm mode), the weight load, the optimizer's
parameter groups and the output shape of a dry forward. Exits 2 on any validation error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune import plugins
from finetune.cli import help_text, usage, wants_help
from finetune.compose.allowlist import take_allow_flags
from finetune.compose.prepare import RECIPE_FILES, compose_config
from finetune.errors import FinetuneError, print_problems, run_entry_point
from finetune.models.sources import MODEL_SOURCES

FLAGS = ("--keys", "--splits", "--json", "--list", "--plugins")
GLOB = frozenset("*?[")
USAGE = usage("inspect")


def module_rows(model: Any, eval_modules: set[str], depth: int,
                joins: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per module down to `depth`: path, type, parameters, what trains (and from
    which epoch, for modules an unfreeze phase opens; `joins` maps parameter -> epoch)."""
    # lazy: keeps torch off a torch-free path
    from finetune.training.freezing import BATCHNORM

    joins = joins or {}
    rows = []
    for path, module in model.named_modules():
        level = path.count(".") + 1 if path else 0
        if level > depth:
            continue
        named = [(f"{path}.{n}" if path else n, p) for n, p in module.named_parameters()]
        params = [p for _, p in named]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        state = ("-" if not total else "train" if trainable == total
                 else "frozen" if trainable == 0 else "partly frozen")
        later = sorted({joins[n] for n, p in named if not p.requires_grad and n in joins})
        if later:
            state += f" (unfreezes at epoch {', '.join(map(str, later))})"
        row = {"path": path or "(model)", "type": type(module).__name__, "params": total,
               "trainable": trainable, "state": state}
        if isinstance(module, BATCHNORM):
            row["bn"] = "eval (stats fixed)" if path in eval_modules else "train (stats update)"
        rows.append(row)
    return rows


def split_points(model: Any) -> list[str]:
    """The candidate `freeze.train_from` values: each top-level child; for a timm model, the
    layers of its own grouping (group_matcher: its stem, every block or stage, the head)."""
    # lazy: keeps torch off a torch-free path
    from finetune.training.optim import timm_layers

    grouped = timm_layers(model)
    modules = dict(model.named_modules())
    if grouped is not None:
        points = [u for u in grouped[0] if u in modules and u]
        if len(points) > 1:
            return points
    return [name for name, _ in model.named_children()]


def split_rows(model: Any) -> list[dict[str, Any]]:
    """Each candidate `freeze.train_from` (split_points), with what would train."""
    # lazy: keeps torch off a torch-free path
    from finetune.training.freezing import plan_freeze

    sizes = dict(model.named_parameters())
    total = sum(p.numel() for p in sizes.values())
    rows = []
    for index, name in enumerate(split_points(model)):
        try:
            plan = plan_freeze(model, name)
        except FinetuneError:
            continue  # nothing would train from here
        trainable = sum(sizes[p].numel() for p in plan.trainable)
        rows.append({"index": index, "train_from": name, "trainable": trainable,
                     "share": round(trainable / total, 4) if total else 0.0})
    return rows


def inspect_plan(cfg: DictConfig, recipe: str, depth: int = 2, keys: bool = False,
                 splits: bool = False) -> dict[str, Any]:
    """The plan of a run as data (what `--json` prints)."""
    # lazy: keeps torch off a torch-free path
    from finetune.models import adapters

    # lazy: keeps torch off a torch-free path
    from finetune.training.plan import plan_run

    run_plan = plan_run(cfg, train_sources=False)
    run_plan.raise_problems()
    built, freeze, prep, notes = run_plan.built, run_plan.freeze, run_plan.prep, run_plan.notes
    assert built is not None and freeze is not None and prep is not None
    data_info: dict[str, Any] = {"name": cfg.data.name}
    if run_plan.data is not None:
        data_info.update(classes=run_plan.class_names,
                         train_images=len(run_plan.data.train_set),
                         val_images=len(run_plan.data.val_set))
    sizes = {n: p.numel() for n, p in built.model.named_parameters()}
    total = sum(sizes.values())
    groups = [{"name": g.name, "epoch": g.join_epoch, "lr": g.lr,
               "weight_decay": g.weight_decay, "warmup_epochs": g.warmup_epochs,
               "tensors": len(g.params), "params": sum(sizes[n] for n in g.params),
               "first": g.params[0] if g.params else None}
              for g in run_plan.groups]
    phases = [{**stage.to_dict(), "trainable_params": sum(sizes[n] for n in stage.trainable),
               "share": round(sum(sizes[n] for n in stage.trainable) / total, 4) if total else 0,
               "bn_eval": len(stage.eval_modules),
               "groups": [g["name"] for g in groups if g["epoch"] == stage.epoch]}
              for stage in freeze.stages]
    joins = {n: stage.epoch for stage in freeze.stages[1:] for n in stage.params}
    cached = run_plan.cache_reason
    plan: dict[str, Any] = {
        "recipe": {"name": recipe,
                   "file": str(RECIPE_FILES[recipe]) if recipe in RECIPE_FILES else None},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data": data_info,
        "preprocessing": prep.to_dict(),
        "head_paths": built.head_paths,
        "load_report": {**built.report.to_dict(), "table": built.report.table()},
        "freeze": {"train_from": freeze.train_from, "frozen_tensors": len(freeze.frozen),
                   "trainable_tensors": len(freeze.trainable),
                   "bn": freeze.bn, "bn_eval": freeze.eval_modules, "phases": phases},
        "optimizer": {"name": cfg.optim.name, "groups": groups},
        "feature_cache": cached,
        "decode_cache": run_plan.data.decode_choice(run_plan.cache_cut is not None)
        if run_plan.data is not None else None,
        "output_shape": built.output_shape,
        "modules": module_rows(built.model, set(freeze.eval_modules), depth, joins),
        "notes": notes,
    }
    if built.adapter is not None:
        adapted = sum(sizes[n] for n in sizes if adapters.is_adapter_param(n))
        trainable = sum(sizes[n] for n in freeze.trainable)
        plan["adapter"] = {**built.adapter.to_dict(), "layers": {
            name: {"rank": r, "alpha": a} for name, (r, a) in built.adapter.targets.items()},
            "adapter_params": adapted, "trainable_params": trainable,
            "base_params": total - adapted,
            "trainable_share": round(trainable / (total - adapted), 6)}
    if keys:
        fate = {k: "loaded" for k in built.report.loaded} | {k: "new" for k in built.report.new}
        plan["keys"] = [{"key": k, "shape": list(v.shape), "fate": fate.get(k, "-")}
                        for k, v in built.model.state_dict().items()]
    if splits:
        plan["splits"] = split_rows(built.model)
    return plan


def render(plan: dict[str, Any]) -> str:
    """The plan for a person to read."""
    out = [f"recipe: {plan['recipe']['name']} ({plan['recipe']['file'] or 'conf/config.yaml'})",
           "", "== config ==", OmegaConf.to_yaml(plan["config"]).rstrip(), "",
           f"== data == {plan['data']}", f"== preprocessing == {plan['preprocessing']}", "",
           plan["load_report"]["table"], ""]
    out += [f"note: {n}" for n in plan["notes"]]
    freeze = plan["freeze"]
    start = ("adapters on the frozen base model" if "adapter" in plan
             else f"train from {freeze['train_from'] or 'the first layer'}")
    out += [f"== freeze == {start}: "
            f"{freeze['trainable_tensors']} tensors train, {freeze['frozen_tensors']} frozen, "
            f"{len(freeze['bn_eval'])} BatchNorm layers in eval mode (bn: {freeze['bn']})", ""]
    if "adapter" in plan:
        a = plan["adapter"]
        out += [f"== adapter == {a['type']} on {a['modules']} layers ({a['selector']}); "
                f"{a['adapter_params']:,} adapter parameters; {a['trainable_params']:,} "
                f"train, {100 * a['trainable_share']:.2f}% of the base model's "
                f"{a['base_params']:,}; trained fully: {', '.join(a['train_fully'])}"]
        out += [f"  {name:<40} rank {v['rank']:>4}  alpha {v['alpha']:g}"
                for name, v in a["layers"].items()]
        out.append("")
    out += ["== phases == (what trains from each epoch on)"]
    for phase in freeze["phases"]:
        out.append(f"  epoch {phase['epoch']:>3}: {phase['selector']:<28} {phase['params']:>4} "
                   f"tensors join; {phase['trainable_params']:>12,} parameters train "
                   f"({100 * phase['share']:.1f}%), {phase['bn_eval']} BN in eval; groups "
                   f"{', '.join(phase['groups'])}")
    out += ["", f"== optimizer == {plan['optimizer']['name']} (learning rates before the "
            "schedule scales them)"]
    for g in plan["optimizer"]["groups"]:
        warm = f", warm-up {g['warmup_epochs']} epochs" if g["warmup_epochs"] else ""
        out.append(f"  {g['name']:<24} from epoch {g['epoch']}: lr {g['lr']:.3g}, weight decay "
                   f"{g['weight_decay']:g}{warm}, {g['tensors']} tensors, {g['params']:,} "
                   f"parameters (from {g['first']})")
    out += ["", f"== feature cache == {plan['feature_cache']}",
            *([f"== decoded-image cache == {plan['decode_cache']}"]
              if plan["decode_cache"] else []),
            "", f"== output == {output_line(plan['output_shape'])}", "",
            f"== modules == (head: {', '.join(plan['head_paths']) or 'none'})",
            f"  {'path':<34} {'type':<22} {'params':>12}  state"]
    for row in plan["modules"]:
        bn = f"  [BN {row['bn']}]" if "bn" in row else ""
        out.append(f"  {row['path']:<34} {row['type']:<22} {row['params']:>12,}  "
                   f"{row['state']}{bn}")
    if "splits" in plan:
        out += ["", "== split points (freeze.train_from) =="]
        out += [f"  {r['index']:>3}  {r['train_from']:<20} {r['trainable']:>12,} trainable "
                f"({100 * r['share']:.1f}%)" for r in plan["splits"]]
    if "keys" in plan:
        out += ["", "== state-dict keys =="]
        out += [f"  {k['key']:<50} {k['shape']!s:<22} {k['fate']}" for k in plan["keys"]]
    return "\n".join(out)


def model_listing(source: str, pattern: str | None) -> str:
    """The models of a source whose name matches `pattern` (a glob), one per line; for timm
    with its pretrained tags (weights.name)."""

    if source not in MODEL_SOURCES:
        raise FinetuneError(f"model.source={source!r} is not one of "
                            f"{', '.join(MODEL_SOURCES)}")
    maker = MODEL_SOURCES[source]
    missing = maker.available()
    if missing:
        raise FinetuneError(missing)
    names = maker.names(pattern)
    if not names:
        raise FinetuneError(f"no {source} model matches model.name={pattern!r}; try a wider "
                            "pattern, e.g. 'convnext*'")
    tags: dict[str, list[str]] = {}
    if source == "timm":
        # lazy: an optional extra (finetune[timm])
        import timm

        for full in timm.list_pretrained(f"{pattern}.*" if pattern else ""):
            arch, _, tag = full.partition(".")
            tags.setdefault(arch, []).append(tag)
    lines = [f"{n:<40} {', '.join(tags[n])}" if tags.get(n) else n for n in names]
    head = f"{len(names)} {source} models" + (f" matching {pattern}" if pattern else "")
    more = " (name, then its pretrained tags for weights.name)" if source == "timm" else ""
    return "\n".join([head + more, *lines])


def plugin_listing(tables: list[dict[str, Any]]) -> str:
    """Each extension table: its key, its entries (a plugin's marked with where it comes
    from) and the entry point group a package registers new ones in."""
    lines = []
    for table in tables:
        names = [e["name"] + (f" (plugin: {e['plugin']})" if e["plugin"] else "")
                 for e in table["entries"]]
        lines.append(f"{table['key']:<15} {', '.join(names)}")
        lines.append(f"{'':<15} entry point group: {table['group']}")
    return "\n".join(lines)


def output_line(shape: list[int]) -> str:
    """What the model gives per image: a classifier's shape, or a detector's boxes."""
    if shape:
        return f"{shape} per image (dry forward)"
    return ("boxes (N, 4) x1, y1, x2, y2 in the image's pixels, labels (N,) and scores (N,) "
            "per image: a detector (dry forward)")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print(help_text("inspect", "Prints the plan: data, model, weights (the load "
                        "report), what trains from which epoch, the optimizer groups and the "
                        "feature-cache decision. --json: the same as data; --plugins: every "
                        "extension table and the installed plugins' entries; --keys: every "
                        "state-dict key and its fate; --splits: every split point; --list, or a "
                        "glob in model.name (model.source=timm model.name='convnext*'): the "
                        "models that match, with timm's pretrained tags."))
        return
    try:
        args = take_allow_flags(args)
    except FinetuneError as err:
        print_problems(err)
        raise SystemExit(2) from None
    depth = 2
    if "--depth" in args:
        at = args.index("--depth")
        try:
            depth = int(args[at + 1])
        except (IndexError, ValueError):
            print(f"finetune inspect: error: --depth needs a number; {USAGE}", file=sys.stderr)
            raise SystemExit(2) from None
        del args[at:at + 2]
    flags = {a for a in args if a in FLAGS}
    unknown = [a for a in args if a.startswith("-") and a not in FLAGS]
    if unknown:
        print(f"finetune inspect: error: unknown option {unknown[0]}; {USAGE}", file=sys.stderr)
        raise SystemExit(2)
    if "--plugins" in flags:
        try:
            tables = plugins.listing()
        except FinetuneError as err:
            print_problems(err)
            raise SystemExit(2) from None
        print(json.dumps(tables, indent=2) if "--json" in flags else plugin_listing(tables))
        return
    overrides = [a for a in args if a not in FLAGS]
    settings = dict(a.partition("=")[::2] for a in overrides if "=" in a)
    name = settings.get("model.name", "").strip("'\"")
    if "--list" in flags or GLOB & set(name):
        try:
            print(model_listing(settings.get("model.source", "torchvision"), name or None))
        except FinetuneError as err:
            print_problems(err)
            raise SystemExit(2) from None
        return
    try:
        cfg, recipe = compose_config(overrides)
        plan = inspect_plan(cfg, recipe, depth, "--keys" in flags, "--splits" in flags)
    except FinetuneError as err:
        print_problems(err)
        raise SystemExit(2) from None
    print(json.dumps(plan, indent=2, default=str) if "--json" in flags else render(plan))


if __name__ == "__main__":
    run_entry_point(main)
