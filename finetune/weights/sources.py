"""The weight sources, one small object each, found in one table (`SOURCES`).

A source knows what its config needs (`problems`), which torchvision weights entry sets the
builder arguments and preprocessing (`entry`, `preprocessing_entry`), how to read its tensors
(`read`), whether they are at hand offline (`unreachable`), what a run of it does on the
machine (`effects`) and how `recipes list` names it (`label`). Adding a source is one class
and one entry in SOURCES (docs/extending.md). The module imports no torch: `weights.source`
choices are checked from this table at compose time; reading imports what it needs.
"""

from __future__ import annotations

import importlib.util
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError
from finetune.extensions import Table
from finetune.locations import resolve_recipe
from finetune.models.sources import MODEL_SOURCES, model_source_of, timm_pretrained_cfg, timm_tags
from finetune.weights import hub
from finetune.weights.hub import local_dir_weights

if TYPE_CHECKING:
    import torch

    from finetune.weights.load_report import LoadReport


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
        # lazy: keeps torch off a torch-free path
        from finetune.models import backbones

        try:
            backbones.weights_enum(cfg.model.name, cfg.weights.name)
        except FinetuneError as err:
            return err.problems
        return []

    def entry(self, cfg: Any) -> Any:
        # lazy: keeps torch off a torch-free path
        from finetune.models import backbones

        return backbones.weights_enum(cfg.model.name, cfg.weights.name)

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_torchvision

        return read_torchvision(model_name, weights.name)

    def _url(self, cfg: Any) -> str:
        return self.entry(cfg).url

    def unreachable(self, cfg: Any) -> str | None:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import hub_path, named_hash_problem

        url = self._url(cfg)
        if hub_path(url).is_file():  # validate and the run refuse the same file alike
            return named_hash_problem(hub_path(url),
                                      f"weights {cfg.model.name}/{self.entry(cfg).name}")
        return _head_problem(url, f"put it at {hub_path(url)} (torch's hub cache)")

    def effects(self, cfg: Any) -> list[str]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import hub_path

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
        # a .pth of a known architecture expects its usual weights' preprocessing

        return model_source_of(cfg).default_entry(cfg.model.name)

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_file, read_run

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
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_run

        return read_run(weights.path)


class Url(File):
    """A download, stored in finetune's cache under its sha256."""

    name = "url"

    def problems(self, cfg: Any) -> list[str]:
        return [] if cfg.weights.url else [
            "weights.source=url needs weights.url=http(s)://... or file://..."]

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_url

        return read_url(weights.url, weights.sha256)

    def _cached(self, cfg: Any) -> Path | None:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import cached_download

        return cached_download(cfg.weights.url, (cfg.weights.sha256 or "").lower() or None)

    def unreachable(self, cfg: Any) -> str | None:
        if self._cached(cfg):
            return None
        return _head_problem(cfg.weights.url, "or use weights.source=file weights.path=FILE")

    def effects(self, cfg: Any) -> list[str]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import downloads_dir

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
        if not cfg.weights.recipe:
            return ["weights.source=recipe needs weights.recipe=NAME_OR_PATH"]
        try:
            resolve_recipe(cfg.weights.recipe)
        except FinetuneError as err:
            return err.problems
        return []

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_recipe

        return read_recipe(weights.recipe, list(weights.recipe_overrides),
                           train_sources)

    def effects(self, cfg: Any) -> list[str]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import sources_dir

        overrides = cfg.weights.recipe_overrides
        more = f" with {' '.join(overrides)}" if overrides else ""
        return [f"trains recipe {cfg.weights.recipe}{more} first, in a process of its own, "
                f"into {sources_dir()} (unless a verified run of it is there)"]

    def label(self, cfg: Any) -> str:
        return f"recipe:{cfg.weights.recipe}"


class Timm(WeightSource):
    """A timm model's pretrained tag (`weights.name`: e.g. fb_in22k_ft_in1k, or DEFAULT),
    read from its Hub repo through huggingface_hub's cache."""

    name = "timm"
    needs_model = True  # its entry is looked up by model name

    def problems(self, cfg: Any) -> list[str]:
        if model_source_of(cfg).name != "timm":
            return ["weights.source=timm needs model.source=timm (a timm architecture); for "
                    "torchvision models use weights.source=torchvision"]
        missing = MODEL_SOURCES["timm"].available()
        if missing:
            return [missing]
        try:
            entry = self.entry(cfg)
        except FinetuneError as err:
            return err.problems
        if not entry.get("hf_hub_id"):
            url = entry.get("url")
            more = (f"; use weights.source=url weights.url={url}" if url else "")
            return [f"weights: timm has no Hub weights for {cfg.model.name} tag "
                    f"{cfg.weights.name}{more}"]
        return []

    def entry(self, cfg: Any) -> dict[str, Any]:
        try:
            found = timm_pretrained_cfg(cfg.model.name, cfg.weights.name)
        except RuntimeError:  # timm: "Invalid pretrained tag"
            found = None
        if found is None:
            tags = timm_tags(cfg.model.name)
            listed = ", ".join(tags) if tags else "none: timm has no pretrained weights for it"
            raise FinetuneError(f"weights.name={cfg.weights.name!r} is not a pretrained tag of "
                                f"timm's {cfg.model.name}; its tags: {listed} (or DEFAULT)")
        return found

    def _where(self, cfg: Any) -> tuple[str, str | None]:
        entry = self.entry(cfg)
        return entry["hf_hub_id"], entry.get("hf_hub_filename")

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_hub

        entry = timm_pretrained_cfg(model_name, weights.name) or {}
        tensors, report = read_hub(entry["hf_hub_id"], weights.revision,
                                   entry.get("hf_hub_filename"), "timm",
                                   f"weights {model_name}.{entry.get('tag')}", weights.sha256)
        report.hub = {**(report.hub or {}), "tag": entry.get("tag")}
        return tensors, report

    def unreachable(self, cfg: Any) -> str | None:
        repo, filename = self._where(cfg)
        return _hub_unreachable(repo, filename, cfg.weights.revision)

    def effects(self, cfg: Any) -> list[str]:
        repo, filename = self._where(cfg)
        return _hub_effects(repo, filename, cfg.weights.revision)

    def label(self, cfg: Any) -> str:
        return f"timm:{cfg.weights.name}"


class HfHub(WeightSource):
    """A weights file of any Hugging Face Hub repo (`weights.repo`, `weights.revision`,
    `weights.file`), through huggingface_hub's cache; a timm repo's config.json sets the
    preprocessing."""

    name = "hf_hub"

    def problems(self, cfg: Any) -> list[str]:
        if importlib.util.find_spec("huggingface_hub") is None:
            return ["weights.source=hf_hub needs the huggingface_hub package: pip install "
                    "'finetune[timm]'"]
        if not cfg.weights.repo:
            return ["weights.source=hf_hub needs weights.repo=ORG/NAME, e.g. "
                    "timm/convnext_tiny.fb_in1k"]
        return [p for p in (hub.repo_problem(cfg.weights.repo),
                            hub.file_problem(cfg.weights.file)) if p]

    def entry(self, cfg: Any) -> dict[str, Any] | None:
        if cfg.model.get("source") != "timm":
            return None
        try:
            path = hub.fetch(cfg.weights.repo, hub.CONFIG_FILE, cfg.weights.revision,
                             f"weights.repo={cfg.weights.repo}")
        except FinetuneError:  # no config.json (or offline): the architecture's own
            return _timm_default(cfg)
        return hub.config_cfg(hub.read_config(path, f"weights.repo={cfg.weights.repo}")) \
            or _timm_default(cfg)

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_hub

        return read_hub(weights.repo, weights.revision, weights.file, "hf_hub",
                        f"weights.repo={weights.repo}", weights.sha256)

    def unreachable(self, cfg: Any) -> str | None:
        return _hub_unreachable(cfg.weights.repo, cfg.weights.file, cfg.weights.revision)

    def effects(self, cfg: Any) -> list[str]:
        return _hub_effects(cfg.weights.repo, cfg.weights.file, cfg.weights.revision)

    def label(self, cfg: Any) -> str:
        return f"hf_hub:{cfg.weights.repo}"


class LocalDir(WeightSource):
    """A folder with config.json and model.safetensors, as timm saves one (`local-dir:`)."""

    name = "local_dir"

    def problems(self, cfg: Any) -> list[str]:
        path = cfg.weights.path
        if not path:
            return ["weights.source=local_dir needs weights.path=FOLDER (config.json + "
                    "model.safetensors)"]
        folder = Path(path).expanduser()
        if not folder.is_dir():
            return [f"weights.path={path!r}: no such folder"]
        if local_dir_weights(folder) is None:
            return [f"weights.path={path!r}: no model.safetensors or pytorch_model.bin in it"]
        return self._config_problems(cfg)

    def _config(self, cfg: Any) -> dict[str, Any] | None:
        path = Path(cfg.weights.path).expanduser() / hub.CONFIG_FILE
        return hub.read_config(path, f"weights.path={cfg.weights.path}") if path.is_file() \
            else None

    def _config_problems(self, cfg: Any) -> list[str]:
        try:
            data = self._config(cfg)
        except FinetuneError as err:
            return err.problems
        arch = (data or {}).get("architecture")
        if isinstance(arch, str) and cfg.model.get("source") == "timm" and \
                arch.split(".")[0] != str(cfg.model.name).split(".")[0]:
            return [f"weights.path={cfg.weights.path!r}: its config.json is for {arch}, "
                    f"model.name={cfg.model.name}; set model.name={arch.split('.')[0]}"]
        return []

    def entry(self, cfg: Any) -> dict[str, Any] | None:
        if cfg.model.get("source") != "timm":
            return None
        data = self._config(cfg)
        return (hub.config_cfg(data) if data else None) or _timm_default(cfg)

    def read(self, weights: Any, model_name: str, train_sources: bool) -> tuple[dict, Any]:
        # lazy: keeps torch off a torch-free path
        from finetune.weights.readers import read_local_dir

        return read_local_dir(weights.path)

    def effects(self, cfg: Any) -> list[str]:
        return [f"reads weights and config.json from {cfg.weights.path}"]


def _timm_default(cfg: Any) -> dict[str, Any] | None:
    try:
        return timm_pretrained_cfg(cfg.model.name)
    except RuntimeError:
        return None


def _hub_unreachable(repo: str, filename: str | None, revision: str | None) -> str | None:
    names = [filename] if filename else list(hub.WEIGHT_FILES)
    if any(hub.cached(repo, n, revision) for n in names):
        return None
    command = hub.download_command(repo, names[0], revision)
    fix = (f"download it on a machine with internet ({command}) and place it at "
           f"{hub.place_hint(repo, names[0], revision)}")
    if hub.offline():
        return (f"weights: {names[0]} of {repo} is not in the Hugging Face cache and "
                f"HF_HUB_OFFLINE is set; {fix}")
    return _head_problem(f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/"
                         f"{names[0]}", f"place it at {hub.place_hint(repo, names[0], revision)}"
                         f" ({command})")


def _hub_effects(repo: str, filename: str | None, revision: str | None) -> list[str]:
    names = [filename] if filename else list(hub.WEIGHT_FILES)
    found = next((p for p in (hub.cached(repo, n, revision) for n in names) if p), None)
    at = f" at {revision}" if revision else " (its main branch: pin weights.revision)"
    return [f"reads {found} (Hugging Face cache)" if found else
            f"downloads {names[0]} of {repo}{at} into {hub.cache_dir()} (the Hugging Face cache)"]


SOURCES = Table("weights.source", "finetune.weight_sources", "weight source")
SOURCES.add(NoWeights(), Torchvision(), File(), Url(), Run(), Recipe(), Timm(), HfHub(),
            LocalDir())


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


def read_source(cfg: Any, model_name: str, train_sources: bool = True
                ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The tensors `cfg` (the weights group) names, read by its source (this table).

    Args:
        train_sources: whether a recipe source without a run may be trained now.
    """
    return SOURCES[cfg.source].read(cfg, model_name, train_sources)
