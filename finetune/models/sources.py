"""The model sources, one small object each, found in one table (`MODEL_SOURCES`).

`model.source` names where the architecture comes from: `torchvision` (its classification
models) or `timm` (any `timm.list_models()` name; the optional extra `finetune[timm]`). A
source knows its model names (`names`, `problems`), builds the architecture with random
initialization (`build`: weights are finetune.weights' job), finds and replaces its
classifier (`replace_heads`), sets the builder arguments pretrained weights imply
(`pretrained_kwargs`), says which preprocessing an architecture's usual weights expect
(`default_entry`) and what input sizes it takes (`size_hint`). Adding a source is one class
and one entry in MODEL_SOURCES. The module imports no torch: `model.source` choices are
checked from this table at compose time.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from typing import Any

from finetune.errors import FinetuneError, did_you_mean
from finetune.extensions import Table

# Builder arguments that would make a builder load weights by itself, unchecked and
# unreported (and for timm, read files or fetch from the Hub): refused from every source.
BUILDER_LOADS = ("weights", "weights_backbone", "pretrained", "pretrained_cfg",
                 "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "pretrained_strict")


class ModelSource:
    """Where architectures come from; `name` is its `model.source` value."""

    name = ""
    package = ""  # the package it needs (checked before anything is imported)

    def available(self) -> str | None:
        """Why this source cannot be used here (its package is missing), else None."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return (f"model.source={self.name} needs the {self.package} package: pip install "
                    f"'finetune[{self.name}]'")
        return None

    def names(self, pattern: str | None = None) -> list[str]:
        raise NotImplementedError

    def problems(self, name: str) -> list[str]:
        """Why `name` is not a model of this source ([] when it is)."""
        missing = self.available()
        if missing:
            return [missing]
        names = self.names()
        if self.base_name(name) in names:
            return []
        return [f"model.name={name!r} is not a {self.name} classification model"
                f"{did_you_mean(name, names)}; {self.listing}"]

    listing = ""

    def base_name(self, name: str) -> str:
        return name

    def build(self, name: str, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def replace_heads(self, model: Any, num_classes: int, dropout: float,
                      hidden: list[int]) -> list[str]:
        raise NotImplementedError

    def pretrained_kwargs(self, name: str, entry: Any, crop: int | None,
                          channels: int) -> dict[str, Any]:
        """Builder arguments these weights (and the run's input) imply; the user's win."""
        return {}

    def default_entry(self, name: str) -> Any:
        """The pretrained entry whose preprocessing a file of this architecture expects."""
        return None

    def size_hint(self, name: str, build_kwargs: dict[str, Any], crop: int) -> str:
        return "raise data.image_size"


class Torchvision(ModelSource):
    name = "torchvision"
    listing = "see torchvision.models.list_models(module=torchvision.models)"

    def names(self, pattern: str | None = None) -> list[str]:
        # lazy: keeps torch off a torch-free path
        from finetune.models import backbones

        names = backbones.list_backbones()
        return _matching(names, pattern)

    def build(self, name: str, kwargs: dict[str, Any]) -> Any:
        # lazy: keeps torch off a torch-free path
        from finetune.models import backbones

        return backbones.build(name, kwargs)

    def replace_heads(self, model: Any, num_classes: int, dropout: float,
                      hidden: list[int]) -> list[str]:
        # lazy: keeps torch off a torch-free path
        from finetune.models import heads

        return heads.replace_heads(model, num_classes, dropout, hidden)

    def pretrained_kwargs(self, name: str, entry: Any, crop: int | None,
                          channels: int) -> dict[str, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.models import backbones

        kwargs = backbones.pretrained_kwargs(name, entry) if entry is not None else {}
        if name.startswith("vit_") and crop:
            # built for the run's image size; pretrained weights of another size have their
            # position embedding resampled when they load
            kwargs["image_size"] = crop
        return kwargs

    def default_entry(self, name: str) -> Any:
        # lazy: keeps torch off a torch-free path
        from finetune.models import backbones

        return backbones.weights_enum(name, "DEFAULT")

    def size_hint(self, name: str, build_kwargs: dict[str, Any], crop: int) -> str:
        if name.startswith("vit_"):
            size = build_kwargs.get("image_size", 224)
            return (f"a ViT takes exactly its image_size ({size} px here): set "
                    f"data.image_size={size}, or model.kwargs.image_size={crop}")
        if name.startswith("maxvit"):
            size = build_kwargs.get("input_size", [224, 224])
            return f"maxvit takes exactly its input_size ({size}): set data.image_size={size[0]}"
        if name in ("inception_v3", "googlenet"):
            return "raise data.image_size (inception_v3 takes at least 75 px, 299 with aux_logits)"
        return "raise data.image_size"


class Timm(ModelSource):
    name = "timm"
    package = "timm"
    listing = ("see timm.list_models(), or finetune inspect model.source=timm "
               "model.name='convnext*' --list")

    def names(self, pattern: str | None = None) -> list[str]:
        # lazy: an optional extra (finetune[timm])
        import timm

        return list(timm.list_models(pattern or ""))

    def base_name(self, name: str) -> str:
        return name.split(".", 1)[0]  # convnext_tiny.fb_in1k: the architecture, then a tag

    def build(self, name: str, kwargs: dict[str, Any]) -> Any:
        # lazy: an optional extra (finetune[timm])
        import timm

        problems = self.problems(name)
        if problems:
            raise FinetuneError(problems)
        try:
            return timm.create_model(self.base_name(name), pretrained=False, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as err:
            first = " ".join(str(err).split())[:200] or type(err).__name__
            raise FinetuneError(f"model.kwargs={kwargs} rejected by timm's {name} builder: "
                                f"{first}") from None

    def replace_heads(self, model: Any, num_classes: int, dropout: float,
                      hidden: list[int]) -> list[str]:
        # lazy: keeps torch off a torch-free path
        from torch import nn

        # lazy: keeps torch off a torch-free path
        from finetune.models import heads

        # lazy: keeps torch off a torch-free path
        from finetune.models.surgery import set_module

        # timm's own classifier reset keeps the model's global pooling and head layout
        model.reset_classifier(num_classes)
        paths = classifier_paths(model)
        if not paths:
            raise FinetuneError(f"{type(model).__name__}: timm's get_classifier() names no "
                                "layer; set `head: none` and build the head with surgery")
        if dropout or hidden:
            # the last Linear of the classifier (timm wraps some: ClassifierHead.fc)
            inner = [n for n, m in model.get_submodule(paths[0]).named_modules()
                     if isinstance(m, nn.Linear) and m.out_features == num_classes]
            if not inner:
                raise FinetuneError(f"head.dropout / head.hidden: the classifier {paths[0]} of "
                                    "this timm model holds no Linear layer to widen; leave them "
                                    "out or build the head with surgery")
            path = ".".join(p for p in (paths[0], inner[-1]) if p)
            old = model.get_submodule(path)
            head = heads.make_head(old.in_features, num_classes, dropout, hidden)
            set_module(model, path, head.to(old.weight.device))
        return paths

    def pretrained_kwargs(self, name: str, entry: Any, crop: int | None,
                          channels: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        cfg = entry if isinstance(entry, dict) else self.default_entry(name)
        if cfg and cfg.get("fixed_input_size") and crop:
            size = (cfg.get("input_size") or (3, 224, 224))[-1]
            if size != crop:
                kwargs["img_size"] = crop  # the position embedding is resampled on load
        if channels != 3:
            kwargs["in_chans"] = channels  # the first conv is adapted on load
        return kwargs

    def default_entry(self, name: str) -> dict[str, Any] | None:
        return timm_pretrained_cfg(name)

    def size_hint(self, name: str, build_kwargs: dict[str, Any], crop: int) -> str:
        return (f"raise data.image_size, or set model.kwargs.img_size={crop} where the model "
                "takes one")


MODEL_SOURCES = Table("model.source", "finetune.model_sources", "model source")
MODEL_SOURCES.add(Torchvision(), Timm())


def model_source_of(cfg: Any) -> ModelSource:
    """The source `cfg.model.source` names (the schema check made sure it is one)."""
    return MODEL_SOURCES[cfg.model.get("source", "torchvision") or "torchvision"]


def builder_loads_problem(key: str, where: str) -> str:
    return (f"{where}.{key}: the builder would load weights by itself, unchecked and "
            "unreported; use weights.source=torchvision | timm | hf_hub | local_dir (and "
            "weights.name for the tag)")


def _matching(names: list[str], pattern: str | None) -> list[str]:
    return [n for n in names if not pattern or fnmatch.fnmatchcase(n, pattern)]


def classifier_paths(model: Any) -> list[str]:
    """Module paths of a timm model's classifier(s) (get_classifier; distilled models have
    two), main first."""
    found = model.get_classifier()
    found = found if isinstance(found, tuple | list) else (found,)
    by_id = {id(m): name for name, m in model.named_modules()}
    return [by_id[id(m)] for m in found if id(m) in by_id and by_id[id(m)]]


def timm_pretrained_cfg(name: str, tag: str | None = None) -> dict[str, Any] | None:
    """timm's pretrained config of `name` (an architecture, optionally `.tag`) with `tag`
    (None or DEFAULT: the architecture's default tag), as a plain dict; None if it has none."""
    # lazy: an optional extra (finetune[timm])
    from timm.models import get_pretrained_cfg

    base, _, own_tag = name.partition(".")
    chosen = tag if tag and tag != "DEFAULT" else own_tag
    if chosen and "." in chosen:  # a full name in weights.name: convnext_tiny.fb_in1k
        chosen = chosen.split(".", 1)[1]
    cfg = get_pretrained_cfg(f"{base}.{chosen}" if chosen else base, allow_unregistered=False)
    return None if cfg is None else dict(cfg.to_dict())


def timm_tags(name: str) -> list[str]:
    """The pretrained tags timm has for an architecture (convnext_tiny -> fb_in1k, ...)."""
    # lazy: an optional extra (finetune[timm])
    import timm

    base = name.split(".", 1)[0]
    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{base}.*")]
