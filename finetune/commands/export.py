"""`finetune export run=RUN_DIR format=torchscript|onnx [output=PATH]`

Exports the run's model as it was trained (surgery included; feature extractors too), checks
parity against the eager model on a batch of another size (max abs difference printed, above
1e-4 fails and nothing is left behind), and writes a JSON beside it with the class names and
preprocessing. This module is the command (`--help` imports no torch); the work is in
finetune/rundir/exporting.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from finetune.cli import help_text, parse_args, usage, wants_help
from finetune.errors import FinetuneError, run_entry_point

COMMAND = "export"


def export(run_dir: str | Path, fmt: str, output: str | Path | None = None) -> dict[str, Any]:
    """Export a run dir's model (`fmt`: torchscript or onnx), parity-checked; returns what
    the JSON beside the file says."""
    # lazy: keeps torch off a torch-free path
    from finetune.rundir.exporting import export as export_run

    return export_run(run_dir, fmt, output)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print(help_text(COMMAND, __doc__.split("\n\n", 1)[1]))
        return
    try:
        options = parse_args(args, {"run": None, "format": None, "output": ""}, usage(COMMAND))
        info = export(options["run"], options["format"], options["output"] or None)
    except FinetuneError as err:
        for line in err.problems:
            print(f"finetune export: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    tolerance = info.get("tolerance")
    if "parity_boxes_compared" in info:  # a detector's
        parity = (f"{info['parity_boxes_compared']} boxes as the model finds them: boxes within "
                  f"{info['parity_max_box_diff']:.2e} px, scores within "
                  f"{info['parity_max_score_diff']:.2e} (tolerance {tolerance['boxes']} px, "
                  f"{tolerance['scores']})")
    elif info.get("parity_max_abs_diff") is not None:
        parity = f"max abs difference {info['parity_max_abs_diff']:.2e} (tolerance {tolerance})"
    else:
        parity = "parity not checked: onnxruntime is not installed"
    print(f"finetune export: {info['format']} -> {info['file']}\n"
          f"  {parity}; class names and preprocessing in {info['file']}.json")


if __name__ == "__main__":
    run_entry_point(main)
