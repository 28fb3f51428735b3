"""`python -m finetune.recipes ...`, kept for scripts written before `finetune recipes ...`
(finetune/commands/recipes.py): the same arguments, the same output."""

from finetune.commands.recipes import main
from finetune.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
