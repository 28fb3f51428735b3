"""`finetune predict run=RUN_DIR input=FILE_OR_DIR [output=predictions.csv] [topk=3]
[batch_size=64] [max_pixels=N] [tta=none|flip|crops|flip+crops] [min_score=0.5] [draw=DIR]`

Writes a CSV: path, then the top-k labels (class names) and probabilities. Unreadable images,
and those over max_pixels (default: the run's data.max_image_pixels), are listed and skipped.
tta= averages the logits of each image's views: its mirror (flip), its five crops (crops), or
both (ten views); slower by as many views. A detection run writes one CSV row per box found
(path, class, score, x1, y1, x2, y2 in the image's pixels) with a score of at least min_score,
and a JSON beside it with every image's boxes; draw=DIR also writes each image with its boxes
drawn (batch_size defaults to 4 for a detector). A segmentation run writes a palette PNG mask
per image into <output stem>_masks/ beside the CSV (one row per image: its mask file and the
share of its pixels per class); draw=DIR also writes each image with its classes' colours over
it.
(The work is in finetune/rundir/inference.py and box_inference.py; this module is only the
command.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from finetune.cli import help_text, parse_args, usage, wants_help
from finetune.errors import ConfigError, FinetuneError, run_entry_point
from finetune.tasks.table import task_of

COMMAND = "predict"

# "": the run's data.max_image_pixels; a batch of 64 (4 for a detector); 0.5 for a detector
ARGS = {"run": None, "input": None, "output": "predictions.csv", "topk": "3",
        "batch_size": "", "max_pixels": "", "tta": "none", "min_score": "", "draw": ""}
DETECTOR_BATCH = 4  # images of any size, each resized to the detector's 800 px by default


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


def draw_problem(draw: str) -> str | None:
    """Why the drawn images cannot go to `draw` (checked before any image is read)."""
    if draw and Path(draw).expanduser().exists() and not Path(draw).expanduser().is_dir():
        return f"draw={draw}: is a file; give a folder for the drawn images (made if missing)"
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(help_text(COMMAND, __doc__.split("\n\n", 1)[1].split("\n\n")[0]))
        return
    try:
        args = parse_args(argv, ARGS, usage(COMMAND))
        try:
            topk = int(args["topk"])
            batch_size = int(args["batch_size"]) if args["batch_size"] else None
            max_pixels = int(args["max_pixels"]) if args["max_pixels"] else None
            min_score = float(args["min_score"]) if args["min_score"] else None
        except ValueError:
            raise FinetuneError("topk, batch_size and max_pixels are whole numbers and "
                                f"min_score a number; {usage(COMMAND)}") from None
        if min(topk, batch_size or 1, max_pixels or 1) < 1:
            raise FinetuneError(f"topk, batch_size and max_pixels must be >= 1; {usage(COMMAND)}")
        problems = [p for p in (output_problem(args["output"]), draw_problem(args["draw"]))
                    if p]
        if problems:
            raise ConfigError(problems)
        # lazy: keeps torch off a torch-free path
        from finetune.rundir.inference import list_images, load_run

        model = load_run(args["run"])
        paths = list_images(args["input"])
        kind = task_of(model.manifest.task).model_kind
        if kind == "detector":
            predictions, written = predict_boxes(args, model, paths, batch_size, max_pixels,
                                                 min_score)
        elif kind == "segmenter":
            predictions, written = predict_masks(args, model, paths, batch_size, max_pixels)
        else:
            predictions, written = predict_classes(args, model, paths, topk, batch_size,
                                                   max_pixels, min_score)
    except FinetuneError as err:
        for line in err.problems:
            print(f"finetune predict: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"finetune predict: {len(predictions.rows)} images -> {', '.join(written)}"
          + (f"; {len(predictions.unreadable)} unreadable, skipped" if predictions.unreadable
             else ""))


def _report_unreadable(predictions: Any, where: str) -> None:
    for path, reason in predictions.unreadable:
        print(f"finetune {COMMAND}: skipped unreadable image {path}: {reason}", file=sys.stderr)
    if not predictions.rows:
        raise FinetuneError(f"input={where}: none of its {len(predictions.unreadable)} images "
                            "could be read")


def predict_classes(args: dict[str, str], model: Any, paths: list[Path], topk: int,
                    batch_size: int | None, max_pixels: int | None, min_score: float | None
                    ) -> tuple[Any, list[str]]:
    """A classifier's top-k (or label sets) per image, into the CSV."""
    # lazy: keeps torch off a torch-free path
    from finetune.rundir.inference import predict_images, write_predictions

    given = [k for k in ("min_score", "draw") if args[k]]
    if given:
        raise FinetuneError(f"{', '.join(given)}: only for a detection run's boxes; this run "
                            f"is task={model.manifest.task} (remove {given[0]}=)")
    predictions = predict_images(model, paths, topk, batch_size or 64, max_pixels,
                                 args["tta"])
    _report_unreadable(predictions, args["input"])
    write_predictions(predictions, Path(args["output"]).expanduser())
    return predictions, [args["output"]]


def predict_boxes(args: dict[str, str], model: Any, paths: list[Path],
                  batch_size: int | None, max_pixels: int | None, min_score: float | None
                  ) -> tuple[Any, list[str]]:
    """A detector's boxes per image: the CSV, the JSON beside it, and drawn images."""
    # lazy: keeps torch off a torch-free path
    from finetune.rundir import box_inference

    if args["tta"] != "none":
        raise FinetuneError(f"tta={args['tta']}: test-time augmentation averages a "
                            "classifier's logits; a detection run finds boxes without it "
                            "(remove tta=)")
    predictions = box_inference.predict_boxes(
        model, paths, batch_size or DETECTOR_BATCH, max_pixels,
        box_inference.DEFAULT_MIN_SCORE if min_score is None else min_score)
    _report_unreadable(predictions, args["input"])
    output = Path(args["output"]).expanduser()
    written = [str(output), str(box_inference.write_box_predictions(predictions, output))]
    if args["draw"]:
        drawn = box_inference.draw_predictions(predictions, Path(args["draw"]).expanduser())
        written.append(f"{len(drawn)} drawn images in {args['draw']}")
    return predictions, written



def predict_masks(args: dict[str, str], model: Any, paths: list[Path],
                  batch_size: int | None, max_pixels: int | None) -> tuple[Any, list[str]]:
    """A segmentation model's mask per image: palette PNGs beside the CSV, overlays in
    draw=DIR."""
    # lazy: keeps torch off a torch-free path
    from finetune.rundir import mask_inference

    given = [k for k in ("min_score",) if args[k]] + (["tta"] if args["tta"] != "none" else [])
    if given:
        raise FinetuneError(f"{', '.join(given)}: not taken by a segmentation run's masks "
                            f"(remove {given[0]}=)")
    predictions = mask_inference.predict_masks(model, paths, batch_size or DETECTOR_BATCH,
                                               max_pixels)
    _report_unreadable(predictions, args["input"])
    written = mask_inference.write_mask_predictions(
        predictions, Path(args["output"]).expanduser(),
        Path(args["draw"]).expanduser() if args["draw"] else None)
    return predictions, written


if __name__ == "__main__":
    run_entry_point(main)
