"""`python -m finetune [COMMAND] ...` and the `finetune` console script: one front door.

COMMAND is train (the default), predict, evaluate, export, report, inspect or recipes;
`finetune --help` lists them, `finetune COMMAND --help` explains one.
"""

from __future__ import annotations

from finetune.commands import main
from finetune.errors import run_entry_point


def cli() -> None:
    """The `finetune` console script."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
