"""`python -m finetune.inspect ...`, kept for scripts written before `finetune inspect ...`
(finetune/commands/inspect.py): the same arguments, the same output."""

from finetune.commands.inspect import main
from finetune.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
