"""`python -m finetune.export ...`, kept for scripts written before `finetune export ...`
(finetune/commands/export.py): the same arguments, the same output."""

from finetune.commands.export import main
from finetune.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
