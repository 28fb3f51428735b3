"""`finetune evaluate run=RUN_DIR [data=... data.root=... | data.KEY=...]
[split=auto|test|val|train|all] [calibrate=true] [tta=none|flip|crops|flip+crops]
[output=DIR] [batch_size=64]`

Evaluates a finished run on labelled data: by default the run's own data (the split it never
trained on: test when it has one, else val), or any data given with data= / data.* (its
test split when it has one, else all of it). Classes are matched by name (the data may hold a
subset of the run's classes). Writes eval.json (accuracy, top-5, per-class precision /
recall / F1 / support, macro and weighted averages, the confusion matrix in counts and
normalized, the ECE over 15 bins and the reliability table, the most confidently wrong
images) and eval_predictions.csv into the run dir (or output=DIR), and rebuilds its
report.html. calibrate=true first fits a temperature on the run's own validation split and
records it in the manifest: predict and export apply it from then on; eval.json shows the
figures before and after. tta= evaluates with test-time augmentation (each image's views'
logits averaged: its mirror, its five crops, or both); eval.json records it. A detection
run is measured on box data (its own validation split, or all of any box data): mAP, AP per
class, the PR curve and the worst images (docs/detection.md); batch_size defaults to 4 there.
A segmentation run is measured on masks the same way (its validation split, or all of any
mask data, classes matched by name, at the run's input size): mIoU, pixel accuracy, Dice, IoU
per class, the pixel confusion matrix and the worst images (docs/segmentation.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune.cli import help_text, parse_args, usage, wants_help
from finetune.compose import gate
from finetune.compose.prepare import compose_config
from finetune.compose.schema import DataConfig
from finetune.data.formats import FORMATS
from finetune.errors import ConfigError, FinetuneError, run_entry_point
from finetune.rundir.manifest import TEMPERATURES, temperature_holds
from finetune.tasks.table import task_of

COMMAND = "evaluate"
ARGS: dict[str, str | None] = {"run": None, "split": "auto", "calibrate": "false",
                               "tta": "none", "output": "", "batch_size": ""}
DETECTOR_BATCH = 4  # a detector's images, each resized to its 800 px by default
SPLITS = ("auto", "test", "val", "train", "all")
EVAL = "eval.json"  # (html_report.EVAL_FILE: the run's page shows it)
EVAL_PREDICTIONS = "eval_predictions.csv"


def data_config(recorded: dict[str, Any] | None, overrides: list[str]) -> Any:
    """The data group to evaluate on: the run's recorded one (gated like a received recipe),
    or, when `overrides` name any data key, that data alone, composed as a run would be."""


    if overrides:
        cfg, _ = compose_config(overrides)
        return cfg.data
    if not isinstance(recorded, dict):
        raise FinetuneError("run: its manifest records no data config; give the data to "
                            "evaluate on: data=imagefolder data.root=PATH")
    problems = gate.recipe_problems({"data": recorded}, "run: its recorded data config")
    if problems:
        raise ConfigError(problems)

    return OmegaConf.merge(OmegaConf.structured(DataConfig), recorded)


def label_map(data_classes: list[str], run_classes: list[str]) -> list[int]:
    """The run's class index of each data class (matched by name)."""
    unknown = [c for c in data_classes if c not in run_classes]
    if unknown:
        shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise FinetuneError(f"data: the class{'es' if len(unknown) > 1 else ''} {shown} "
                            f"{'are' if len(unknown) > 1 else 'is'} not among the run's "
                            f"{len(run_classes)} classes ({', '.join(run_classes[:12])}); "
                            "leave them out with data.classes=[...], or evaluate a run trained "
                            "on them")
    return [run_classes.index(c) for c in data_classes]


def choose_split(split: str, data: Any, own: bool) -> str:
    """`auto`: test when the data has a test split; else val for the run's own data (the
    rest it trained on), all of it for other data."""
    if split != "auto":
        if split == "test" and data.test_set is None:
            raise FinetuneError("split=test: this data has no test split (a test/ folder, a "
                                "split column, or data.test_fraction); use split=val or all")
        return split
    if data.test_set is not None:
        return "test"
    return "val" if own else "all"


def calibrate_on_val(model: Any, recorded: dict[str, Any] | None, batch_size: int,
                     own: Any = None) -> dict[str, Any]:
    """Fit the temperature on the run's own validation split (as the run split it); `own`:
    the run's own datamodule when it is already built."""
    # lazy: keeps torch off a torch-free path
    from finetune.data.datamodule import build_datamodule

    # lazy: keeps torch off a torch-free path
    from finetune.rundir.evaluation import collect, fit_temperature, item_names

    manifest = model.manifest
    if own is None:
        own = build_datamodule(data_config(recorded, []), model.preprocessing, manifest.seed)
    outputs = collect(model, own.eval_dataset("val"), batch_size,
                      item_names(own.val_set), label_map(own.class_names, model.class_names))
    temperature = fit_temperature(outputs.logits, outputs.labels)
    problem = temperature_problem(temperature, float((outputs.logits.argmax(1)
                                                      == outputs.labels).float().mean()))
    if problem:
        raise FinetuneError(problem)
    return {"temperature": temperature, "fitted_on": "val", "images": len(outputs.labels)}


def temperature_problem(temperature: float, accuracy: float) -> str | None:
    """Why a fitted temperature cannot be trusted (the manifest's rule: TEMPERATURES); None:
    it can be written."""
    if temperature_holds(temperature):
        return None
    low, high = TEMPERATURES
    why = ("the model is confidently wrong on many validation images, and only flattening "
           "every prediction toward uniform lowers its loss" if temperature > high else
           "the model's validation predictions are almost all right and far from confident")
    return (f"calibrate=true: the fitted temperature {temperature:g} is outside [{low:g}, "
            f"{high:g}] (val accuracy {accuracy:.4f}): {why}; no temperature was written (the "
            "run dir is unchanged). Check the model first: its report's verdict and confusion "
            "matrix")


def evaluate_run(run: str | Path, overrides: list[str] = (), split: str = "auto",
                 calibrate: bool = False, output: str | Path | None = None,
                 batch_size: int | None = None, tta: str = "none"
                 ) -> tuple[dict[str, Any], Path]:
    """Evaluate a run dir (see the module doc); returns (eval.json's content, its path).
    `batch_size`: 64 images, 4 for a detector, unless given."""
    # lazy: keeps torch off a torch-free path
    from finetune.data.datamodule import build_datamodule

    # lazy: keeps torch off a torch-free path
    from finetune.rundir import artifacts, evaluation, html_report

    # lazy: keeps torch off a torch-free path
    from finetune.rundir.inference import load_run, with_tta

    if split not in SPLITS:
        raise FinetuneError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if calibrate and tta != "none":
        raise FinetuneError(f"calibrate=true with tta={tta}: the temperature is fitted for "
                            "the plain predictions predict and export make; calibrate "
                            "first, then evaluate with tta=")
    model = load_run(run)
    if task_of(model.manifest.task).model_kind == "detector":
        return evaluate_detector(run, model, overrides, split, calibrate, output,
                                 batch_size or DETECTOR_BATCH, tta)
    if task_of(model.manifest.task).model_kind == "segmenter":
        return evaluate_segmenter(run, model, overrides, split, calibrate, output,
                                  batch_size or DETECTOR_BATCH, tta)
    batch_size = batch_size or 64
    net, transform = with_tta(model, tta)  # a wrong tta= is refused before the data is read
    manifest = model.manifest
    if not model.class_names:
        raise FinetuneError(f"run={run}: a feature extractor (head: none) has no classes to "
                            "evaluate")
    if not task_of(manifest.task).evaluates:
        raise FinetuneError(f"run={run}: evaluate measures one-class-per-image runs; a "
                            f"task={manifest.task} run's figures (for label sets: mAP and per-"
                            "label F1) are in its metrics.json")
    recorded = (manifest.config or {}).get("data")
    data_cfg = data_config(recorded, list(overrides))
    data = build_datamodule(data_cfg, model.preprocessing, manifest.seed)
    chosen = choose_split(split, data, not overrides)
    mapping = label_map(data.class_names, model.class_names)
    calibration = calibrate_on_val(model, recorded, batch_size,
                                   None if overrides else data) if calibrate else None
    temperature = calibration["temperature"] if calibration else manifest.temperature
    dataset = data.eval_dataset(chosen, None if tta == "none" else transform)
    result, outputs = evaluation.evaluate(net, dataset, model.class_names, temperature,
                                          batch_size, mapping)
    if temperature != 1.0:
        plain = evaluation.metrics(outputs, model.class_names, 1.0)
        result["uncalibrated"] = {k: plain[k] for k in ("ece", "loss", "acc")}
    result = {"run": str(Path(run).resolve()), "split": chosen, "tta": tta,
              "data": {"name": data_cfg.name, "root": data_cfg.get("root"),
                       "overrides": list(overrides)},
              **({"calibration": calibration} if calibration else {}), **result}
    out_dir = Path(output).expanduser() if output else Path(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    if calibration:  # predict and export apply it from now on
        manifest.temperature = temperature
        manifest.calibration = calibration
        manifest.write(Path(run))
    reliability = out_dir / "eval_reliability.png"
    # lazy: matplotlib is slow to import; `--help` and a mistake must not pay for it
    from finetune.rundir import plots

    plots.plot_reliability(result["reliability"], reliability, f"{chosen} split")
    result["reliability_png"] = html_report.png_uri(reliability)
    artifacts.write_csv(out_dir / EVAL_PREDICTIONS, evaluation.PREDICTION_HEADER,
                        evaluation.predictions_rows(outputs, model.class_names, temperature))
    artifacts.write_json(out_dir / EVAL, result)
    if out_dir.resolve() == Path(run).resolve():
        html_report.write_run_report(Path(run))
    return result, out_dir / EVAL


def evaluate_detector(run: str | Path, model: Any, overrides: list[str], split: str,
                      calibrate: bool, output: str | Path | None, batch_size: int, tta: str
                      ) -> tuple[dict[str, Any], Path]:
    """A detection run on labelled box data: its own validation split, or any box data's
    (all of it); eval.json, eval_predictions.csv (one row per found box), eval_pr_curve.png,
    and the run's report rebuilt."""
    # lazy: keeps torch off a torch-free path
    from finetune.data.box_datamodule import read_box_items

    # lazy: keeps torch off a torch-free path
    from finetune.data.box_datasets import BoxDataset, box_transform

    # lazy: keeps torch off a torch-free path
    from finetune.rundir import artifacts, box_evaluation, html_report

    data_cfg, chosen = _data_of(model, overrides, split, calibrate, tta, "boxes")
    masks = task_of(model.manifest.task).instance_masks
    train, val, names = read_box_items(data_cfg, None, model.manifest.seed, masks)
    items = {"val": val, "train": train, "all": train + val}[chosen]
    mapping = label_map(names, model.class_names)
    dataset = BoxDataset(items, box_transform(False), masks)
    result, outputs = box_evaluation.evaluate_boxes(model, dataset, model.class_names,
                                                    batch_size, mapping)
    result = {"run": str(Path(run).resolve()), "split": chosen, "tta": "none",
              "task": model.manifest.task,
              "data": {"name": data_cfg.name, "root": data_cfg.get("root"),
                       "overrides": list(overrides)}, **result}
    out_dir = Path(output).expanduser() if output else Path(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    # lazy: matplotlib is slow to import; `--help` and a mistake must not pay for it
    from finetune.rundir import plots

    curve = out_dir / "eval_pr_curve.png"
    plots.plot_pr_curve(result["pr_curve"], curve, f"{chosen} split")
    result["pr_curve_png"] = html_report.png_uri(curve)
    artifacts.write_csv(out_dir / EVAL_PREDICTIONS, box_evaluation.HEADER,
                        box_evaluation.prediction_rows(outputs, model.class_names))
    artifacts.write_json(out_dir / EVAL, result)
    if out_dir.resolve() == Path(run).resolve():
        html_report.write_run_report(Path(run))
    return result, out_dir / EVAL


def evaluate_segmenter(run: str | Path, model: Any, overrides: list[str], split: str,
                       calibrate: bool, output: str | Path | None, batch_size: int, tta: str
                       ) -> tuple[dict[str, Any], Path]:
    """A segmentation run on masks: its own validation split, or any mask data's (all of it;
    classes matched by name); eval.json (mIoU, IoU per class, the pixel confusion matrix, the
    worst images), eval_predictions.csv (one row per image), and the run's report rebuilt."""
    # lazy: keeps torch off a torch-free path
    from finetune.data.mask_datamodule import (
        MaskDataset,
        mask_transform,
        read_mask_items,
    )

    # lazy: keeps torch off a torch-free path
    from finetune.rundir import artifacts, html_report, mask_evaluation

    data_cfg, chosen = _data_of(model, overrides, split, calibrate, tta, "masks")
    train, val, names = read_mask_items(data_cfg, None, model.manifest.seed)
    items = {"val": val, "train": train, "all": train + val}[chosen]
    mapping = label_map(names, model.class_names)
    prep = model.preprocessing  # the run's input size, whatever the data's config says
    dataset = MaskDataset(items, mask_transform(prep.crop, prep, False),
                          int(data_cfg.ignore_index))
    paths = dataset.paths
    result, rows = mask_evaluation.evaluate_masks(
        model, dataset, model.class_names, batch_size, mapping,
        [str(p) for p in paths] if paths is not None else None)
    result = {"run": str(Path(run).resolve()), "split": chosen, "tta": "none",
              "task": model.manifest.task,
              "data": {"name": data_cfg.name, "root": data_cfg.get("root"),
                       "overrides": list(overrides)}, **result}
    out_dir = Path(output).expanduser() if output else Path(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_csv(out_dir / EVAL_PREDICTIONS, mask_evaluation.HEADER, rows)
    artifacts.write_json(out_dir / EVAL, result)
    if out_dir.resolve() == Path(run).resolve():
        html_report.write_run_report(Path(run))
    return result, out_dir / EVAL


def _data_of(model: Any, overrides: list[str], split: str, calibrate: bool, tta: str,
             holds: str) -> tuple[Any, str]:
    """(the data config, the split) a detection or segmentation run is evaluated on: its own
    validation split by default, all of any data of `holds` (boxes, masks) given."""
    kind = {"boxes": "detection", "masks": "segmentation"}.get(holds, "")
    given = [k for k, v in (("calibrate=true", calibrate), (f"tta={tta}", tta != "none")) if v]
    if given:
        raise FinetuneError(f"{', '.join(given)}: for a classifier's probabilities; a {kind} "
                            f"run is evaluated on its {holds} as found (remove it)")
    if split not in ("auto", "val", "train", "all"):
        raise FinetuneError(f"split={split}: {holds[:-2] if holds == 'boxes' else 'mask'} data "
                            "has a validation split and no test split; use split=val, train "
                            "or all")
    data_cfg = data_config((model.manifest.config or {}).get("data"), list(overrides))
    held = FORMATS[data_cfg.name].holds
    if held != holds:
        raise FinetuneError(f"data={data_cfg.name} holds "
                            f"{'class labels' if held == 'labels' else held}; a {kind} run is "
                            f"evaluated on {holds[:-2] if holds == 'boxes' else 'mask'} data "
                            f"({', '.join(data_names(holds))})")
    return data_cfg, split if split != "auto" else ("all" if overrides else "val")


def data_names(holds: str) -> list[str]:
    """The data formats that hold `holds` (boxes, masks)."""
    return [name for name, f in FORMATS.items() if f.holds == holds]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(help_text(COMMAND, __doc__.split("\n\n", 1)[1]))
        return
    data_args = [a for a in argv if a.startswith(("data=", "data.", "+data.", "++data."))]
    try:
        args = parse_args([a for a in argv if a not in data_args], ARGS, usage(COMMAND))
        try:
            batch_size = int(args["batch_size"]) if args["batch_size"] else None
        except ValueError:
            raise FinetuneError(f"batch_size is a whole number; {usage(COMMAND)}") from None
        calibrate = args["calibrate"].lower()
        if calibrate not in ("true", "false") or (batch_size is not None and batch_size < 1):
            raise FinetuneError(f"calibrate is true or false and batch_size >= 1; "
                                f"{usage(COMMAND)}")
        result, path = evaluate_run(args["run"], data_args, args["split"], calibrate == "true",
                                    args["output"] or None, batch_size, args["tta"])
    except FinetuneError as err:
        for line in err.problems:
            print(f"finetune {COMMAND}: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    views = "" if result["tta"] == "none" else f" (tta={result['tta']})"
    if "miou" in result:  # a segmentation model's
        print(f"finetune {COMMAND}: {result['split']} split, {result['images']} images, "
              f"{result['pixels']} labelled pixels: mIoU {result['miou']:.4f}, pixel accuracy "
              f"{result['pixel_acc']:.4f}, Dice {result['dice']:.4f}\n  {path}")
        return
    if "map" in result:  # a detector's
        print(f"finetune {COMMAND}: {result['split']} split, {result['images']} images, "
              f"{result['boxes']} boxes: mAP {result['map']:.4f}, mAP@0.5 "
              f"{result['map_50']:.4f}, mAP@0.75 {result['map_75']:.4f}\n  {path}")
        return
    line = (f"finetune {COMMAND}: {result['split']} split{views}, {result['images']} images: acc "
            f"{result['acc']:.4f}, macro F1 {result['macro/f1']:.4f}, ECE {result['ece']:.4f}")
    if "uncalibrated" in result:
        line += (f" (temperature {result['temperature']:g}; before: ECE "
                 f"{result['uncalibrated']['ece']:.4f})")
    print(f"{line}\n  {path}")


if __name__ == "__main__":
    run_entry_point(main)
