"""The weight sources, one small object each, found in one table (`SOURCES`).

A source knows what its config needs (`problems`), which torchvision weights entry sets the
builder arguments and preprocessing (`entry`, `preprocessing_entry`), how to read its tensors
(`read`), whether they are at hand offline (`unreachable`), what a run of it does on the
machine (`effects`) and how `recipes list` names it (`label`). Adding a source is one class
and one entry in SOURCES (docs/extending.md). The module imports no torch: `weights.source`
choices are checked from this table at compose time; reading imports what it needs.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError


class WeightSource:
    """A source of pretrained tensors named by `weights.source`; the base reads nothing."""

    name = ""
    needs_model = False

    def problems(self, cfg: Any) -> list[str]:
        """What the config lacks for this source (weights group and model)."""
        return []

    def entry(self, cfg: Any) -> Any:
        """The torchvision weights entry these weights are (builder arguments follow it)."""
        return None

    def preprocessing_entry(self, cfg: Any) -> Any:
        """The torchvision weights entry whose eval preprocessing the run uses."""
        return self.entry(cfg)

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        """(tensors, LoadReport) of the weights group `weights` for `model_name`."""
        raise NotImplementedError(self.name)

    def unreachable(self, cfg: Any) -> str | None:
        """Why these weights cannot be had now (offline and not cached), else None."""
        return None

    def effects(self, cfg: Any) -> list[str]:
        """What reading them does on this machine (recipes validate lists it)."""
        return []

    def label(self, cfg: Any) -> str:
        return self.name


class NoWeights(WeightSource):
    """Random initialization."""

    name = "none"


class Torchvision(WeightSource):
    """A torchvision weights entry through its own API and torch's hub cache."""

    name = "torchvision"
    needs_model = True  # its entry is looked up by model name

    def problems(self, cfg: Any) -> list[str]:
        from finetune import backbones

        try:
            backbones.weights_enum(cfg.model.name, cfg.weights.name)
        except FinetuneError as err:
            return err.problems
        return []

    def entry(self, cfg: Any) -> Any:
        from finetune import backbones

        return backbones.weights_enum(cfg.model.name, cfg.weights.name)

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        from finetune.sources import read_torchvision

        return read_torchvision(model_name, weights.name)

    def _url(self, cfg: Any) -> str:
        return self.entry(cfg).url

    def unreachable(self, cfg: Any) -> str | None:
        from finetune.sources import hub_path

        url = self._url(cfg)
        if hub_path(url).is_file():
            return None
        return _head_problem(url, f"put it at {hub_path(url)} (torch's hub cache)")

    def effects(self, cfg: Any) -> list[str]:
        from finetune.sources import hub_path

        path = hub_path(self._url(cfg))
        return [f"reads {path}, checked against the hash in its name" if path.is_file()
                else f"downloads {self._url(cfg)} into {path.parent}"]

    def label(self, cfg: Any) -> str:
        return f"torchvision:{cfg.weights.name}"


class File(WeightSource):
    """A state dict, a Lightning checkpoint or a safetensors file (or a run dir)."""

    name = "file"
    needs = "a state dict"

    def problems(self, cfg: Any) -> list[str]:
        if not cfg.weights.path:
            return [f"weights.source={self.name} needs weights.path=PATH to {self.needs}"]
        if not Path(cfg.weights.path).expanduser().exists():
            return [f"weights.path={cfg.weights.path!r}: no such file or folder"]
        return []

    def preprocessing_entry(self, cfg: Any) -> Any:
        # a .pth from torchvision expects the architecture's usual preprocessing
        from finetune import backbones

        return backbones.weights_enum(cfg.model.name, "DEFAULT")

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        from finetune.sources import read_file, read_run

        if Path(weights.path).expanduser().is_dir():
            return read_run(weights.path)
        return read_file(weights.path)

    def effects(self, cfg: Any) -> list[str]:
        return [f"reads weights from {cfg.weights.path}"]


class Run(File):
    """The model.safetensors of a run dir of this framework, checked against its manifest."""

    name = "run"
    needs = "a run dir"

    def preprocessing_entry(self, cfg: Any) -> Any:
        return None

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        from finetune.sources import read_run

        return read_run(weights.path)


class Url(File):
    """A download, stored in finetune's cache under its sha256."""

    name = "url"

    def problems(self, cfg: Any) -> list[str]:
        return [] if cfg.weights.url else [
            "weights.source=url needs weights.url=http(s)://... or file://..."]

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        from finetune.sources import read_url

        return read_url(weights.url, weights.sha256)

    def _cached(self, cfg: Any) -> Path | None:
        from finetune.sources import cached_download

        return cached_download(cfg.weights.url, (cfg.weights.sha256 or "").lower() or None)

    def unreachable(self, cfg: Any) -> str | None:
        if self._cached(cfg):
            return None
        return _head_problem(cfg.weights.url, "or use weights.source=file weights.path=FILE")

    def effects(self, cfg: Any) -> list[str]:
        from finetune.sources import downloads_dir

        cached = self._cached(cfg)
        if cached:
            return [f"reads {cached} (the download of {cfg.weights.url})"]
        pinned = "; pinned" if cfg.weights.sha256 else "; not pinned: set weights.sha256"
        return [f"downloads {cfg.weights.url} into {downloads_dir()} (stored under its "
                f"sha256{pinned})"]


class Recipe(WeightSource):
    """The weights another recipe produces, trained first and reused while its config holds."""

    name = "recipe"

    def problems(self, cfg: Any) -> list[str]:
        from finetune.config import resolve_recipe

        if not cfg.weights.recipe:
            return ["weights.source=recipe needs weights.recipe=NAME_OR_PATH"]
        try:
            resolve_recipe(cfg.weights.recipe)
        except FinetuneError as err:
            return err.problems
        return []

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        from finetune.sources import read_recipe

        return read_recipe(weights.recipe, list(weights.recipe_overrides),
                           train_sources)

    def effects(self, cfg: Any) -> list[str]:
        from finetune.sources import sources_dir

        overrides = cfg.weights.recipe_overrides
        more = f" with {' '.join(overrides)}" if overrides else ""
        return [f"trains recipe {cfg.weights.recipe}{more} first, in a process of its own, "
                f"into {sources_dir()} (unless a verified run of it is there)"]

    def label(self, cfg: Any) -> str:
        return f"recipe:{cfg.weights.recipe}"


SOURCES: dict[str, WeightSource] = {s.name: s for s in (
    NoWeights(), Torchvision(), File(), Url(), Run(), Recipe())}


def source_of(cfg: Any) -> WeightSource:
    """The source `cfg.weights.source` names (the schema check made sure it is one)."""
    return SOURCES[cfg.weights.source]


def _head_problem(url: str, where: str) -> str | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5):
            return None
    except OSError as err:
        return (f"weights: {url} is not cached and cannot be reached "
                f"({getattr(err, 'reason', err)}); download it elsewhere and {where}")
