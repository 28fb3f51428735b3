"""`python -m finetune.report ...`, kept for scripts written before `finetune report ...`
(finetune/commands/report.py): the same arguments, the same output."""

from finetune.commands.report import main
from finetune.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
