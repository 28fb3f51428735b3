"""manifest.json, typed: one writer (training) and one reader (everything that uses a run dir).

The manifest is what a run dir needs to be used: the architecture (model, builder arguments,
head, surgery), the class names, the eval preprocessing, the weights' sha256, and the config
and recipe that made it. A run dir may come from someone else, so the reader checks every
field's type, gates the model description like a recipe (finetune.gate), and checks the
weights file against the recorded sha256; each problem is one sentence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.compose import gate, safe_files
from finetune.errors import ConfigError, FinetuneError
from finetune.rundir import artifacts
from finetune.tasks.table import DEFAULT as DEFAULT_TASK
from finetune.tasks.table import TASKS

FORMAT = 1
# torchvision's InterpolationMode values (checked without importing torch)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
HEAD_FIELDS = ("type", "num_classes", "dropout", "hidden")
PREPROCESSING_FIELDS = {"resize": int, "crop": int, "mean": list, "std": list,
                        "interpolation": str, "channels": int}


# The temperatures a calibration may hold: one rule for the writer (evaluate calibrate=true
# refuses a fit outside it) and the reader (a manifest holding one was changed by hand).
TEMPERATURES = (0.01, 100.0)


def temperature_holds(value: Any) -> bool:
    """Whether `value` is a temperature a manifest may hold (TEMPERATURES)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and TEMPERATURES[0] <= value <= TEMPERATURES[1])


@dataclass
class Manifest:
    """What a finished run dir says about its model (the JSON layout is `to_json`)."""

    model_name: str
    build_kwargs: dict[str, Any]
    head: dict[str, Any]  # type, num_classes, dropout, hidden, paths
    surgery: list[Any]
    output_shape: list[int]
    class_names: list[str] | None
    preprocessing: dict[str, Any]  # the fields of backbones.Preprocessing
    model_sha256: str
    recipe: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    freeze: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    weights: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    balance: dict[str, Any] = field(default_factory=dict)  # class counts, weights, sampler
    ema: dict[str, Any] = field(default_factory=dict)  # model.ema: the saved weights are its
    task: str = DEFAULT_TASK  # finetune.tasks: multiclass; multilabel decides by `thresholds`
    thresholds: dict[str, float] = field(default_factory=dict)
    model_source: str = "torchvision"  # finetune.model_sources: torchvision | timm
    temperature: float = 1.0  # softmax(logits / temperature): set by evaluate calibrate=true
    calibration: dict[str, Any] = field(default_factory=dict)  # how the temperature was fit
    optimizer: dict[str, Any] = field(default_factory=dict)  # name and the planned groups
    adapter: dict[str, Any] = field(default_factory=dict)  # adapter.type: merged into weights

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format": FORMAT, "recipe": data.pop("recipe"),
                "overrides": data.pop("overrides"),
                "model": {"name": data.pop("model_name"), "source": data.pop("model_source"),
                          "build_kwargs": data.pop("build_kwargs")}, **data}

    def write(self, run_dir: Path) -> None:
        artifacts.write_json(run_dir / artifacts.MANIFEST, self.to_json())

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """The manifest in `data`, or every reason it is not one (ConfigError)."""
        if not isinstance(data, dict):
            raise ConfigError([f"{where}: the manifest is not a JSON object"])
        problems = gate.manifest_model_problems(data, where)
        head = data.get("head")
        absent = [k for k in HEAD_FIELDS if isinstance(head, dict) and k not in head]
        if absent:
            problems.append(f"{where}: the manifest's head lacks {', '.join(absent)}; it was "
                            "changed after the run")
        problems += _preprocessing_problems(data.get("preprocessing"), where)
        expected: dict[str, tuple[type, ...]] = {
            "model_sha256": (str,), "output_shape": (list,), "class_names": (list, type(None)),
            "surgery": (list, type(None)), "recipe": (dict, type(None)),
            "overrides": (list, type(None)), "freeze": (dict, type(None)),
            "weights": (dict, type(None)), "config": (dict, type(None)),
            "versions": (dict, type(None)), "seed": (int, type(None))}
        problems += [f"{where}: the manifest's {key} is {type(data.get(key)).__name__}, not "
                     f"{' or '.join(t.__name__ for t in types)}; it was changed after the run"
                     for key, types in expected.items() if not isinstance(data.get(key), types)]
        thresholds = data.get("thresholds")
        if thresholds is not None and not (isinstance(thresholds, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
                for v in thresholds.values())):
            problems.append(f"{where}: the manifest's thresholds are not numbers in [0, 1]; it "
                            "was changed after the run")
        task = data.get("task", DEFAULT_TASK)
        if not isinstance(task, str) or task not in TASKS:
            problems.append(f"{where}: the manifest's task {str(task)[:40]!r} is not one of "
                            f"{', '.join(TASKS)} (a task a plugin adds needs that plugin)")
        if not temperature_holds(data.get("temperature", 1.0)):
            problems.append(f"{where}: the manifest's temperature is not a number in "
                            f"[{TEMPERATURES[0]:g}, {TEMPERATURES[1]:g}]; it was changed after "
                            "the run")
        if isinstance(data.get("class_names"), list) and not all(
                isinstance(c, str) for c in data["class_names"]):
            problems.append(f"{where}: the manifest's class_names are not all names")
        if problems:
            raise ConfigError(problems)
        model, head = data["model"], data["head"]
        return cls(model_name=model["name"], build_kwargs=model.get("build_kwargs") or {},
                   model_source=model.get("source") or "torchvision",
                   head=head, surgery=data.get("surgery") or [],
                   output_shape=data["output_shape"], class_names=data.get("class_names"),
                   preprocessing=data["preprocessing"], model_sha256=data["model_sha256"],
                   recipe=data.get("recipe") or {}, overrides=data.get("overrides") or [],
                   freeze=data.get("freeze") or {}, resumed_from=data.get("resumed_from"),
                   weights=data.get("weights") or {}, seed=data.get("seed") or 0,
                   versions=data.get("versions") or {}, config=data.get("config") or {},
                   created=str(data.get("created", "")),
                   balance=data.get("balance") if isinstance(data.get("balance"), dict) else {},
                   ema=data.get("ema") if isinstance(data.get("ema"), dict) else {},
                   task=task,
                   thresholds=data.get("thresholds") if isinstance(data.get("thresholds"),
                                                                 dict) else {},
                   temperature=float(data.get("temperature", 1.0)),
                   calibration=data.get("calibration") if isinstance(
                       data.get("calibration"), dict) else {},
                   optimizer=data.get("optimizer") if isinstance(data.get("optimizer"),
                                                                 dict) else {},
                   adapter=data.get("adapter") if isinstance(data.get("adapter"), dict)
                   else {})


def _preprocessing_problems(recorded: Any, where: str) -> list[str]:
    if not isinstance(recorded, dict) or not {"resize", "crop", "mean", "std"} <= set(recorded):
        return [f"{where}: the manifest's preprocessing is missing or incomplete"]
    bad = [k for k, v in recorded.items()
           if k not in PREPROCESSING_FIELDS or not isinstance(v, PREPROCESSING_FIELDS[k])
           or isinstance(v, bool)
           or (isinstance(v, list) and not all(isinstance(x, (int, float)) for x in v))]
    if not bad:  # the types hold: now the values
        bad = [k for k in ("resize", "crop") if recorded[k] < 1]
        channels = recorded.get("channels", 3)
        bad += [] if channels in (1, 3) else ["channels"]
        bad += [k for k in ("mean", "std") if len(recorded[k]) not in (1, channels)]
        bad += ["std"] if "std" not in bad and not all(x > 0 for x in recorded["std"]) else []
        bad += [] if recorded.get("interpolation", "bilinear") in INTERPOLATIONS else [
            "interpolation"]
    return [f"{where}: the manifest's preprocessing has a bad {', '.join(map(str, bad))}; it "
            "was changed after the run"] if bad else []


def read_manifest(run_dir: str | Path, key: str = "run") -> tuple[Manifest, Path]:
    """The manifest of a finished run dir and its weights file, checked against each other.

    Args:
        key: the argument the run dir came from, for the messages.
    """
    run = Path(run_dir).expanduser()
    manifest_file, weights_file = run / artifacts.MANIFEST, run / artifacts.WEIGHTS
    if not manifest_file.is_file() or not weights_file.is_file():
        raise FinetuneError(f"{key}={str(run_dir)!r}: not a finished run dir (it needs "
                            f"{artifacts.MANIFEST} and {artifacts.WEIGHTS})")
    data = safe_files.load_json_object(manifest_file, "manifest")
    manifest = Manifest.from_json(data, f"{key}={run_dir}")
    if manifest.model_sha256 != artifacts.file_sha256(weights_file):
        raise FinetuneError(f"{key}={str(run_dir)!r}: {artifacts.WEIGHTS} does not match the "
                            "sha256 in its manifest; the run dir was changed after the run")
    return manifest, weights_file
