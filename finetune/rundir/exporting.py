"""Exporting a run dir: TorchScript or ONNX (the CLI is finetune/commands/export.py).

`finetune export run=RUN_DIR format=torchscript|onnx [output=PATH]`

Exports the run's model as it was trained (surgery included; feature extractors too), checks
parity against the eager model on a batch of another size (max abs difference printed, above
1e-4 fails and nothing is left behind), and writes a JSON beside it with the class names and
preprocessing. A detection run's detector is exported and checked on its boxes, labels and
scores (finetune/rundir/detector_export.py). A segmentation run's model is exported with its
class maps as the output, checked on them and on the share of pixels whose class agrees.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.cli import usage
from finetune.errors import FinetuneError
from finetune.rundir import artifacts, detector_export
from finetune.rundir.inference import load_run
from finetune.tasks.table import task_of

TOLERANCE = 1e-4
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}


def _example(model: nn.Module, batch: int) -> torch.Tensor:
    prep = model.preprocessing
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, prep.channels, prep.crop, prep.crop, generator=generator)


def _torchscript(model: nn.Module, path: Path) -> Any:
    """Trace, save, and return a runner of the saved file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values in forward
        traced = torch.jit.trace(model, _example(model, 2))
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x)


def _too_large_for_one_file(model: nn.Module) -> bool:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.8e9


def _onnx(model: nn.Module, path: Path) -> Any | None:
    """Export with a dynamic batch; a runner through onnxruntime, or None without it."""
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise FinetuneError("format=onnx needs the onnx and onnxscript packages: "
                            "pip install 'finetune[onnx]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (_example(model, 2),), str(path), input_names=["image"],
                          output_names=["output"], dynamo=True,
                          verbose=False,  # its "[torch.onnx] Obtain model graph..." lines
                          # one portable file (the tensors inside the graph), as a model under
                          # protobuf's 2 GB limit can be; larger ones keep model.onnx.data
                          external_data=_too_large_for_one_file(model),
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    # lazy: an optional extra (finetune[onnx])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


class Calibrated(nn.Module):
    """The run's model with its logits divided by the fitted temperature; the run's
    attributes (class names, preprocessing, manifest) kept."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, float(temperature)
        for name in ("class_names", "transform", "preprocessing", "manifest"):
            object.__setattr__(self, name, getattr(model, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


class ClassMaps(nn.Module):
    """A segmentation model with its "out" maps as the one output (batch, classes, height,
    width); the run's attributes kept."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for name in ("class_names", "preprocessing", "manifest"):
            object.__setattr__(self, name, getattr(model, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def export_target(run_dir: str | Path, fmt: str, output: str | Path | None) -> Path:
    """The file to write: `output` when it names a file; inside it when it is a folder (one
    that exists, or ends with /, or has no suffix); model.<format> in the run dir by default."""
    if not output:
        return Path(run_dir) / f"model{SUFFIX[fmt]}"
    path = Path(output).expanduser()
    if path.is_dir() or str(output).endswith(("/", os.sep)) or not path.suffix:
        return path / f"model{SUFFIX[fmt]}"
    return path


def export(run_dir: str | Path, fmt: str, output: str | Path | None = None) -> dict[str, Any]:
    """Export and check parity; returns what the JSON beside the file says."""
    if fmt not in SUFFIX:
        raise FinetuneError(f"format={fmt!r}: choose torchscript or onnx; "
                            f"{usage('export')}")
    model = load_run(run_dir, device="cpu")
    if task_of(model.manifest.task).model_kind == "segmenter":
        model = ClassMaps(model)  # the graph's one output: the class maps
    detector = task_of(model.manifest.task).model_kind == "detector"
    temperature = model.manifest.temperature
    if temperature != 1.0 and not detector:  # calibrated: the graph divides by it
        model = Calibrated(model, temperature)
    target = export_target(run_dir, fmt, output)
    target.parent.mkdir(parents=True, exist_ok=True)
    info_file = target.with_name(f"{target.name}.json")
    for path in (target, info_file):  # refused before anything is written
        artifacts.refuse_links(path)
    # A private, new folder beside the target: nothing planted in the run dir (a link named
    # like our temporary or external-data file) can be followed while the exporter writes.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        checked: dict[str, Any] = {}
        if detector:  # boxes, labels and scores of a list of images (detector_export.py)
            make = detector_export.torchscript if fmt == "torchscript" else detector_export.onnx
            found = make(model, staging / target.name)
            checked = detector_export.parity(model, found, fmt) if found is not None else {}
        runner = None if detector else (_torchscript if fmt == "torchscript" else _onnx)(
            model, staging / target.name)
        difference = agreement = None
        if runner is not None:
            check = _example(model, 3)  # another batch size than traced with
            with torch.inference_mode():
                exported, eager = runner(check), model(check)
            difference = float((exported - eager).abs().max())
            if eager.dim() == 4:  # class maps: how many pixels get the same class
                agreement = float((exported.argmax(1) == eager.argmax(1)).float().mean())
            if difference > TOLERANCE:
                raise FinetuneError(f"parity check failed: max abs difference {difference:.3g} "
                                    f"> {TOLERANCE} between the {fmt} export and the model; "
                                    "nothing was written")
        written = sorted(staging.iterdir())  # the model, and external data the graph names
        for file in written:
            artifacts.refuse_links(target.parent / file.name)
        for file in written:
            os.replace(file, target.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if detector:
        info = {"format": fmt, "file": str(target), "run": str(Path(run_dir).resolve()),
                "class_names": model.class_names,
                **detector_export.io_description(fmt, detector_export.has_mask_branch(model)),
                **checked, "model_sha256": model.manifest.model_sha256,
                "task": model.manifest.task, "torch": torch.__version__}
        artifacts.write_json(info_file, info)
        return info
    info = {"format": fmt, "file": str(target), "run": str(Path(run_dir).resolve()),
            "class_names": model.class_names, "preprocessing": model.preprocessing.to_dict(),
            "preprocessing_steps": model.preprocessing.steps(),  # `resize` is the short side
            "input_shape": ["batch", model.preprocessing.channels, model.preprocessing.crop,
                            model.preprocessing.crop],
            "output_shape": ["batch", *model.manifest.output_shape],
            "parity_max_abs_diff": difference, "tolerance": TOLERANCE,
            **({"parity_pixel_agreement": agreement} if agreement is not None else {}),
            "model_sha256": model.manifest.model_sha256,
            # how to read the outputs, as the run's task says (softmax over classes and
            # the temperature; or a sigmoid per label and its threshold)
            "task": model.manifest.task,
            **task_of(model.manifest.task).export_outputs(model.manifest),
            "torch": torch.__version__}
    artifacts.write_json(info_file, info)
    return info
