"""finetune: declarative fine-tuning of torchvision image classifiers.

    import finetune
    result = finetune.train("quickstart", ["trainer.max_epochs=2"])   # in this process
    model = finetune.load(result.run_dir)
    predictions = finetune.predict(model, ["digit.png"], topk=3)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch import nn

    from finetune.rundir.box_inference import BoxPredictions
    from finetune.rundir.inference import Predictions
    from finetune.rundir.mask_inference import MaskPredictions
    from finetune.training.run import RunResult

__version__ = "0.1.0"


def train(recipe: str | Path = "base", overrides: Sequence[str] = (),
          run_dir: str | Path | None = None) -> RunResult:
    """Run a recipe (a shipped name or a path) with `key=value` overrides in this process, as
    `python -m finetune recipe=RECIPE OVERRIDES...` does; returns the run dir, its metrics and
    the monitored metric. `run_dir` replaces the timestamped outputs/<recipe>/<time> dir."""
    # lazy: `import finetune` stays torch-free
    from finetune.training.run import train_in_process

    return train_in_process(recipe, overrides, run_dir)


def load(run_dir: str | Path, device: Any = None) -> nn.Module:
    """The fine-tuned model of a run dir, in eval mode, with `class_names` and `transform`
    (its eval preprocessing) attached. Only tensors are read (safetensors)."""
    # lazy: `import finetune` stays torch-free
    from finetune.rundir.inference import load_run

    return load_run(run_dir, device)


def predict(model_or_run: Any, images: Any, topk: int = 3, batch_size: int = 64,
            tta: str = "none") -> Predictions | BoxPredictions | MaskPredictions:
    """Top-k class names and probabilities for image files (a path, a folder, or a list of
    paths) from a model `load` returned, or from a run dir. `tta`: none | flip | crops |
    flip+crops (test-time augmentation: the logits of each image's views averaged). A
    detection run's: the boxes scoring at least 0.5 per image (BoxPredictions; finer control
    in finetune.rundir.box_inference.predict_boxes). A segmentation run's: a mask of class ids
    per image, at its own size (MaskPredictions)."""
    # lazy: keeps torch off a torch-free path
    from torch import nn

    # lazy: `import finetune` stays torch-free
    from finetune.errors import FinetuneError

    # lazy: `import finetune` stays torch-free
    from finetune.rundir.inference import list_images, load_run, predict_images

    # lazy: `import finetune` stays light
    from finetune.tasks.table import task_of

    model = model_or_run if isinstance(model_or_run, nn.Module) else load_run(model_or_run)
    paths = ([Path(p) for p in images] if isinstance(images, list | tuple)
             else list_images(images))
    manifest = getattr(model, "manifest", None)
    if manifest is not None and task_of(manifest.task).model_kind == "detector":
        # lazy: keeps torch off a torch-free path
        from finetune.rundir.box_inference import DEFAULT_MIN_SCORE, predict_boxes

        if tta != "none":
            raise FinetuneError(f"tta={tta}: test-time augmentation averages a classifier's "
                                "logits; a detection run finds boxes without it")
        return predict_boxes(model, paths, min(batch_size, 4), min_score=DEFAULT_MIN_SCORE)
    if manifest is not None and task_of(manifest.task).model_kind == "segmenter":
        # lazy: keeps torch off a torch-free path
        from finetune.rundir.mask_inference import predict_masks

        if tta != "none":
            raise FinetuneError(f"tta={tta}: test-time augmentation averages a classifier's "
                                "logits; a segmentation run gives masks without it")
        return predict_masks(model, paths, min(batch_size, 8))
    return predict_images(model, paths, topk, batch_size, tta=tta)

