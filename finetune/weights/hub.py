"""Weights from the Hugging Face Hub, through huggingface_hub's own cache.

timm's pretrained weights live in Hub repos (`timm/convnext_tiny.fb_in1k`); `weights.source:
hf_hub` names any repo. Files are fetched with `hf_hub_download` into the Hub cache
(`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`: the layout
`models--org--name/snapshots/<commit>/<file>` with `refs/<revision>` naming the commit), and
read from there after: with `HF_HUB_OFFLINE=1` (or no network) only the cache is read, and a
file that is not there is one sentence naming the repo, the file and where to place it. The
environment is read at each call (not when huggingface_hub was imported). Weights are
read as safetensors (or a weights-only torch file); a repo's config.json is plain data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from finetune.compose import safe_files
from finetune.errors import FinetuneError
from finetune.rundir import artifacts

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader tries
CONFIG_FILE = "config.json"
_REPO = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def cache_dir() -> Path:
    """The Hub cache huggingface_hub uses, from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def repo_problem(repo: Any, key: str = "weights.repo") -> str | None:
    if not isinstance(repo, str) or not _REPO.fullmatch(repo) or ".." in repo:
        return (f"{key}={repo!r} is not a Hugging Face repo id; write org/name, e.g. "
                "timm/convnext_tiny.fb_in1k")
    return None


def file_problem(name: Any, key: str = "weights.file") -> str | None:
    if name is None:
        return None
    parts = str(name).split("/")
    if not isinstance(name, str) or name.startswith("/") or any(p in ("", ".", "..")
                                                                  for p in parts) \
            or not name.endswith(_WEIGHT_SUFFIXES):
        return (f"{key}={name!r}: give a weights file inside the repo (a relative path ending "
                f"in {' / '.join(_WEIGHT_SUFFIXES)}), e.g. model.safetensors")
    return None


def download_command(repo: str, filename: str, revision: str | None = None) -> str:
    """The command of huggingface_hub's own CLI (`hf`) that fetches the file."""
    return f"hf download {repo} {filename}" + (f" --revision {revision}" if revision else "")


def place_hint(repo: str, filename: str, revision: str | None) -> str:
    """Where to put a file by hand so the Hub cache has it (huggingface_hub's own layout)."""
    folder = cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = revision or "main"
    if revision and _COMMIT.fullmatch(revision):
        return f"{folder}/snapshots/{revision}/{filename}"
    return (f"{folder}/snapshots/<commit>/{filename} with the commit hash in "
            f"{folder}/refs/{ref} (or copy the whole models--{repo.replace('/', '--')} folder "
            "from a machine's Hub cache)")


def cached(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """The file in the Hub cache, if it is there (nothing is fetched)."""
    # lazy: an optional extra (finetune[timm])
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir()),
                                   revision=revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


class NotOnHub(FinetuneError):
    """The repo exists (or is cached) but has no such file."""


def fetch(repo: str, filename: str, revision: str | None, what: str) -> Path:
    """The file from the Hub cache, downloaded there first unless offline.

    Raises:
        NotOnHub: the repo has no such file.
        FinetuneError: offline and not cached, or the download failed: one sentence.
    """
    # lazy: an optional extra (finetune[timm])
    from huggingface_hub import hf_hub_download

    # lazy: an optional extra (finetune[timm])
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    found = cached(repo, filename, revision)
    if found is not None:
        return found
    offline_now = offline()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision,
                                    cache_dir=str(cache_dir()), local_files_only=offline_now))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if offline_now
               else "the Hub cannot be reached from here")
        raise FinetuneError(
            f"{what}: {filename} of {repo} is not in the Hugging Face cache and {why}; "
            f"download it on a machine with internet ({download_command(repo, filename, revision)}"
            f") and place it at {place_hint(repo, filename, revision)}") from None
    except EntryNotFoundError:
        raise NotOnHub(f"{what}: the repo {repo} has no file {filename}") from None
    except RevisionNotFoundError:
        raise FinetuneError(f"{what}: the repo {repo} has no revision {revision!r}; give a "
                            "branch, tag or commit hash of it (weights.revision)") from None
    except RepositoryNotFoundError:
        raise FinetuneError(f"{what}: no repo {repo} on the Hugging Face Hub (or it is private "
                            "and no token is set: hf auth login)") from None
    except Exception as err:  # network errors of every kind
        first = " ".join(str(err).split())[:200] or type(err).__name__
        raise FinetuneError(f"{what}: cannot download {filename} of {repo} ({first}); place it "
                            f"at {place_hint(repo, filename, revision)}") from None


def commit_of(path: Path) -> str | None:
    """The commit a file of the Hub cache belongs to (its snapshot folder's name)."""
    parts = path.parts
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts) and _COMMIT.fullmatch(parts[index + 1]):
            return parts[index + 1]
    return None


def weights_file(repo: str, revision: str | None, filename: str | None,
                 what: str) -> tuple[Path, str]:
    """(the cached weights file, its name in the repo): `filename`, or model.safetensors,
    then pytorch_model.bin, as timm's hub loader looks for them."""
    names = [filename] if filename else list(WEIGHT_FILES)
    for i, name in enumerate(names):
        try:
            return fetch(repo, name, revision, what), name
        except NotOnHub:
            if i == len(names) - 1:
                raise
        except FinetuneError:
            # offline: say the first (preferred) file, unless a later one is cached
            later = [cached(repo, n, revision) for n in names[i + 1:]]
            hit = next(((p, n) for p, n in zip(later, names[i + 1:], strict=True) if p), None)
            if hit:
                return hit
            raise
    raise AssertionError("unreachable")


def check_blob(path: Path, what: str) -> str | None:
    """huggingface_hub keeps a large (LFS) file as blobs/<its sha256>, linked from the
    snapshot: a cached file is read only when its content still has that sha256 (anyone may
    have put it there; the same rule as torch's hash in a file name). Returns the sha256, or
    None when the file is not such a blob (a small file's blob is named by its git hash)."""

    target = path.resolve()
    if target.parent.name != "blobs" or not re.fullmatch(r"[0-9a-f]{64}", target.name):
        return None
    actual = artifacts.file_sha256(target)
    if actual != target.name:
        raise FinetuneError(f"{what}: the cached file {path} (blob {target.name[:16]}...) has "
                            f"sha256 {actual[:16]}...; it is corrupt or was replaced: delete "
                            f"{target} and run again to download it (or place the real file)")
    return actual


def local_dir_weights(folder: Path) -> Path | None:
    """The weights file of a timm-style local folder (config.json + model.safetensors)."""
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def read_config(path: Path, where: str) -> dict[str, Any]:
    """A timm-style config.json (architecture, num_classes, pretrained_cfg): plain data."""
    return safe_files.load_json_object(path, f"{where} config.json")


def config_cfg(data: dict[str, Any]) -> dict[str, Any] | None:
    """The pretrained_cfg a timm config.json carries (preprocessing, first conv, classifier)."""
    cfg = data.get("pretrained_cfg")
    return dict(cfg) if isinstance(cfg, dict) else None
