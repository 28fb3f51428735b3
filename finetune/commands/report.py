"""`finetune report DIR [metric=val/acc]`: the leaderboard of a sweep (and its
report.html), or, for a run dir, its report.html rebuilt.

One row per job found under DIR (a Hydra sweep dir, or any folder of run dirs): its swept
overrides, split point, trainable parameters, best and final validation accuracy, loss,
epochs and training time; sorted by the metric. Written beside the jobs as
leaderboard.csv, leaderboard.md and leaderboard.png (the metric against the split point,
and against the learning rate when it was swept), and printed. Reads only what runs wrote
(metrics.json, metrics.csv, .hydra/), so it works on a sweep that is still running or where
jobs failed: such jobs are listed with their status (and error) and sorted last; a job dir
that cannot be read (damaged, cut short, from someone else) is listed as `unreadable`, with
why, and the rest are still ranked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.cli import help_text, parse_args, usage, wants_help
from finetune.errors import FinetuneError, run_entry_point
from finetune.rundir import html_report
from finetune.sweeps.leaderboard import is_run_dir, print_leaderboard, report

ARGS: dict[str, str | None] = {"metric": "", "out": ""}


USAGE = usage("report")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if wants_help(args):
        print(help_text("report", __doc__.split(chr(10), 2)[2].strip()))
        return

    try:
        positional = [a for a in args if "=" not in a]
        if len(positional) != 1:
            raise FinetuneError(f"give one sweep dir or run dir; {USAGE}")
        options = parse_args([a for a in args if "=" in a], ARGS, USAGE)
        target = Path(positional[0]).expanduser()
        if is_run_dir(target):  # one run: its page
            print(f"finetune report: {html_report.write_run_report(target)}")
            return
        result = report(target, options["metric"],
                        Path(options["out"]).expanduser() if options["out"] else None)
    except FinetuneError as err:
        for line in err.problems:
            print(f"finetune report: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    print_leaderboard(result)


if __name__ == "__main__":
    run_entry_point(main)
