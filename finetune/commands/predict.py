"""`finetune predict run=RUN_DIR input=FILE_OR_DIR [output=predictions.csv] [topk=3]
[batch_size=64] [max_pixels=N] [tta=none|flip|crops|flip+crops]`

Writes a CSV: path, then the top-k labels (class names) and probabilities. Unreadable images,
and those over max_pixels (default: the run's data.max_image_pixels), are listed and skipped.
tta= averages the logits of each image's views: its mirror (flip), its five crops (crops), or
both (ten views); slower by as many views.
(The work is in finetune/rundir/inference.py; this module is only the command.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.cli import help_text, parse_args, usage, wants_help
from finetune.errors import FinetuneError, run_entry_point

COMMAND = "predict"

ARGS = {"run": None, "input": None, "output": "predictions.csv", "topk": "3",
        "batch_size": "64", "max_pixels": "", "tta": "none"}  # "": the run's data.max_image_pixels


def output_problem(output: str) -> str | None:
    """Why predictions cannot be written to `output` (checked before any image is read)."""
    path = Path(output).expanduser()
    if path.is_dir():
        return (f"output={output}: is a folder; give a file name, e.g. "
                f"output={path / 'predictions.csv'}")
    if not path.parent.is_dir():
        return (f"output={output}: its folder {path.parent} does not exist; create it or "
                "choose another path")
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(help_text(COMMAND, __doc__.split("\n\n", 1)[1].split("\n\n")[0]))
        return
    try:
        args = parse_args(argv, ARGS, usage(COMMAND))
        try:
            topk, batch_size = int(args["topk"]), int(args["batch_size"])
            max_pixels = int(args["max_pixels"]) if args["max_pixels"] else None
        except ValueError:
            raise FinetuneError("topk, batch_size and max_pixels are whole numbers; "
                                f"{usage(COMMAND)}") from None
        if min(topk, batch_size, max_pixels or 1) < 1:
            raise FinetuneError(f"topk, batch_size and max_pixels must be >= 1; {usage(COMMAND)}")
        problem = output_problem(args["output"])
        if problem:
            raise FinetuneError(problem)
        # lazy: keeps torch off a torch-free path
        from finetune.rundir.inference import (
            list_images,
            load_run,
            predict_images,
            write_predictions,
        )

        model = load_run(args["run"])
        predictions = predict_images(model, list_images(args["input"]), topk, batch_size,
                                     max_pixels, args["tta"])
        for path, reason in predictions.unreadable:
            print(f"finetune {COMMAND}: skipped unreadable image {path}: {reason}", file=sys.stderr)
        if not predictions.rows:
            raise FinetuneError(f"input={args['input']}: none of its "
                                f"{len(predictions.unreadable)} images could be read")
        write_predictions(predictions, Path(args["output"]).expanduser())
    except FinetuneError as err:
        for line in err.problems:
            print(f"finetune predict: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"finetune predict: {len(predictions.rows)} images -> {args['output']}"
          + (f"; {len(predictions.unreadable)} unreadable, skipped" if predictions.unreadable
             else ""))



if __name__ == "__main__":
    run_entry_point(main)
