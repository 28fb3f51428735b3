"""The commands users type: `finetune COMMAND ...` (or `python -m finetune COMMAND ...`).

`train` is the default, so `finetune recipe=quickstart` trains. Every command module is
torch-free to import: `--help` and a mistake on the command line never import torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from finetune.cli import COMMANDS as USAGES
from finetune.commands import evaluate, export, inspect, predict, recipes, report, train
from finetune.errors import ConfigError, did_you_mean, print_problems

COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "train": train.main, "predict": predict.main, "evaluate": evaluate.main,
    "export": export.main, "report": report.main, "inspect": inspect.main,
    "recipes": recipes.main,
}
assert set(COMMANDS) == set(USAGES), "every command has its usage text in finetune/cli.py"


def main(argv: list[str] | None = None) -> Any:
    """Run `finetune COMMAND ARGS` (COMMAND defaults to train)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    if args and "=" not in args[0] and not args[0].startswith("-"):
        print_problems(ConfigError([
            f"unknown command {args[0]!r}{did_you_mean(args[0], COMMANDS, n=1)}; the commands "
            f"are {', '.join(COMMANDS)} (train is the default: finetune recipe=NAME)"]))
        raise SystemExit(2)
    return train.main(args)

