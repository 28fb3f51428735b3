"""One convention for every command: `key=value` arguments, `--help` (or `-h`) prints the
usage with examples and exits 0 without importing torch, a mistake is one line and exit 2.

The usage texts live here, so `finetune --help` lists every command the same way each command
describes itself (`finetune COMMAND ...`, or `python -m finetune COMMAND ...`; `train` is the
default command). This module imports nothing heavy.
"""

from __future__ import annotations

from finetune.errors import ConfigError, did_you_mean

HELP_FLAGS = ("-h", "--help")

# command, what it does (one line), usage, examples
COMMANDS: dict[str, tuple[str, str, list[str]]] = {
    "train": (
        "train a recipe (CPU, GPU, DDP), or sweep it with -m",
        "finetune [train] recipe=NAME_OR_PATH [key=value ...] [--allow-module PREFIX]",
        ["finetune recipe=quickstart",
         "finetune recipe=resnet50_9cls data.root=~/photos trainer.max_epochs=5",
         "finetune rerun=outputs/quickstart/RUN   (the same run again; with "
         "resume=RUN_DIR it continues)",
         "finetune -m recipe=digits_transfer_splits   (a sweep: one job per split)",
         "finetune recipe=NAME --cfg job   (print the composed config)"]),
    "inspect": (
        "everything a run would do, without training",
        "finetune inspect recipe=NAME_OR_PATH [key=value ...] [--keys] [--splits] "
        "[--json] [--list] [--plugins] [--depth N] [--allow-module PREFIX]",
        ["finetune inspect recipe=resnet50_9cls --splits",
         "finetune inspect model.source=timm model.name='convnext*'   (list models "
         "and their pretrained tags)",
         "finetune inspect --plugins   (every extension table, installed plugins marked)"]),
    "recipes": (
        "find, read, adapt and check recipes",
        "finetune recipes list [--json] | show NAME [--resolved] [key=value ...] | "
        "copy NAME PATH | validate NAME_OR_PATH [key=value ...]",
        ["finetune recipes list",
         "finetune recipes copy resnet50_9cls my_recipe.yaml",
         "finetune recipes validate my_recipe.yaml"]),
    "report": (
        "the leaderboard of a sweep (table, CSV, Markdown, plot, report.html), or a run's "
        "report.html",
        "finetune report SWEEP_OR_RUN_DIR [metric=val/acc] [out=DIR]",
        ["finetune report outputs/sweeps/digits_transfer_splits/RUN",
         "finetune report outputs/quickstart/RUN   (rebuild its report.html)"]),
    "evaluate": (
        "a finished run on labelled data: per class, calibrated (eval.json)",
        "finetune evaluate run=RUN_DIR [data=NAME data.root=PATH ...] "
        "[split=auto|test|val|train|all] [calibrate=true] [output=DIR] [batch_size=64]",
        ["finetune evaluate run=outputs/quickstart/RUN",
         "finetune evaluate run=RUN data=imagefolder data.root=new_images/",
         "finetune evaluate run=RUN calibrate=true   (fit a temperature on val)"]),
    "predict": (
        "classify images with a finished run",
        "finetune predict run=RUN_DIR input=FILE_OR_DIR [output=predictions.csv] "
        "[topk=3] [batch_size=64] [max_pixels=N]",
        ["finetune predict run=outputs/quickstart/RUN input=images/"]),
    "export": (
        "TorchScript or ONNX, parity-checked against the run's model",
        "finetune export run=RUN_DIR format=torchscript|onnx [output=PATH]",
        ["finetune export run=outputs/quickstart/RUN format=onnx"]),
}


def usage(command: str) -> str:
    """`usage: ...` on one line (what an error message ends with)."""
    return f"usage: {COMMANDS[command][1]}"


def help_text(command: str, details: str = "") -> str:
    """What `--help` prints: what the command does, its usage, examples, then the other
    commands."""
    what, line, examples = COMMANDS[command]
    others = "\n".join(f"  finetune {name:<9} {COMMANDS[name][0]}"
                       for name in COMMANDS if name != command)
    parts = [f"finetune {command}: {what}", "", f"usage: {line}", "", "examples:",
             *(f"  {e}" for e in examples), "", "other commands:", others]
    if details:
        parts += ["", details.rstrip()]
    parts += ["", "docs: README.md and docs/ (one page per topic)"]
    return "\n".join(parts)


def wants_help(args: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in args)


def parse_args(argv: list[str], spec: dict[str, str | None], usage_line: str
               ) -> dict[str, str]:
    """`key=value` arguments; unknown keys and missing required ones are one line each, all
    of them at once."""
    values: dict[str, str] = {}
    problems = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in spec:
            problems.append(f"unknown argument {arg!r}{did_you_mean(key, spec, n=1)}; "
                            f"{usage_line}")
            continue
        values[key] = value
    missing = [k for k, v in spec.items() if v is None and k not in values]
    if missing:
        problems.append(f"missing {', '.join(f'{k}=...' for k in missing)}; {usage_line}")
    if problems:
        raise ConfigError(problems)
    return {**{k: v for k, v in spec.items() if v is not None}, **values}
