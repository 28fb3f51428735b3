"""`python -m finetune.evaluate ...`, kept for scripts written before `finetune evaluate ...`
(finetune/commands/evaluate.py): the same arguments, the same output."""

from finetune.commands.evaluate import main
from finetune.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
