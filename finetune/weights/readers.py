"""Where pretrained tensors come from: torchvision, a file, a URL, a run dir, another recipe.

Each reader returns (tensors, LoadReport) with the report's provenance filled in; mapping the
keys and loading them into a model is finetune.weights' job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file

from finetune import locations
from finetune.compose import gate, safe_files
from finetune.errors import ConfigError, FinetuneError
from finetune.models import backbones
from finetune.rundir import artifacts
from finetune.rundir.manifest import read_manifest
from finetune.weights import hub
from finetune.weights.load_report import LoadReport

log = logging.getLogger("finetune")

# Where a checkpoint keeps its tensors when it is not a bare state dict.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "weights")
_CHAIN_ENV = "FINETUNE_RECIPE_CHAIN"
SOURCE_RECORD = "source.json"  # written beside a trained recipe source by the run that needs it
_SHA256 = re.compile(r"[0-9a-f]{64}")


def hub_path(url: str) -> Path:
    """Where torch.hub caches `url`: $TORCH_HOME/hub/checkpoints/<file name>. Only
    torchvision's own weights are read from there (by the name torchvision gives them)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def sources_dir() -> Path:
    """Where recipe sources are trained and reused: finetune's own cache, never a folder a
    recipe or a received run dir could fill."""
    return locations.cache_dir("sources")


def downloads_dir() -> Path:
    """`weights.source: url` downloads, each stored under its own sha256."""
    return locations.cache_dir("downloads")


def _download_suffix(url: str) -> str:
    return ".safetensors" if urlparse(url).path.endswith(".safetensors") else ".pth"


def _url_index(url: str) -> Path:
    return downloads_dir() / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"


def cached_download(url: str, pin: str | None = None) -> Path | None:
    """The cached file of `url` (content-addressed: its name is its sha256), if any."""
    suffix = _download_suffix(url)
    if pin and _SHA256.fullmatch(pin) and (downloads_dir() / f"{pin}{suffix}").is_file():
        return downloads_dir() / f"{pin}{suffix}"
    index = _url_index(url)
    if not index.is_file():
        return None
    entry = safe_files.load_json_object(index, "download index")
    sha = entry.get("sha256")
    if entry.get("url") != url or not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        return None
    path = downloads_dir() / f"{sha}{suffix}"
    return path if path.is_file() and (not pin or sha.startswith(pin)) else None


TRUSTED_WEIGHTS = "trusted_weights.txt"


def trusted_hashes() -> set[str]:
    """sha256s of files the user vouches for though their name says otherwise (weights they
    made and placed under torchvision's name themselves): one per line in
    $FINETUNE_HOME/trusted_weights.txt, a file only the user writes."""
    path = locations.finetune_home() / TRUSTED_WEIGHTS
    if not path.is_file():
        return set()
    text = safe_files.read_text(path, safe_files.MAX_YAML_BYTES, "trusted weights list")
    return {line.split("#")[0].strip().lower() for line in text.splitlines()} - {""}


def _named_hash(path: Path, what: str, prefix: str | None) -> tuple[str | None, str | None]:
    """(the file's sha256, why it may not be read): its sha256 does not start with the hash
    its name carries (torch's check_hash rule) and the user has not vouched for it in
    trusted_weights.txt. (None, None) when its name carries no hash or it is absent."""
    named = torch.hub.HASH_REGEX.search(path.name)
    prefix = prefix or (named.group(1) if named else None)
    if not prefix or not path.is_file():
        return None, None
    actual = artifacts.file_sha256(path)
    if actual.startswith(prefix) or actual in trusted_hashes():
        return actual, None
    trusted = locations.finetune_home() / TRUSTED_WEIGHTS
    return actual, (
        f"{what}: the cached file {path} has sha256 {actual}, which does not start with "
        f"the {prefix} its name promises; it is corrupt or was replaced: delete it "
        "and run again to download the real one, or, if you made it and placed it there "
        f"yourself, vouch for it with this line in {trusted}: {actual} (echo {actual} >> "
        f"{trusted})")


def named_hash_problem(path: Path, what: str, prefix: str | None = None) -> str | None:
    """Why the file in torch's hub cache may not be read (None: it may, or its name carries
    no hash). `recipes validate` and the run ask the same question."""
    return _named_hash(path, what, prefix)[1]


def _verify_named_hash(path: Path, what: str, prefix: str | None = None) -> str:
    """The file's sha256 (hashed once), when named_hash_problem has nothing against it."""
    actual, problem = _named_hash(path, what, prefix)
    if problem:
        raise FinetuneError(problem)
    return actual or artifacts.file_sha256(path)


def _unreadable(path: Path, err: Exception) -> FinetuneError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return FinetuneError(
        f"weights file {path} cannot be read as a weights-only state dict ({first}); if it is "
        "truncated or corrupt, delete it and download it again; if it holds a pickled model "
        "object, convert it to a state dict once, in a trusted place: torch.save("
        "torch.load(path, weights_only=False).state_dict(), 'model.pth')")


def read_torchvision(model_name: str, weights_name: str) -> tuple[dict[str, torch.Tensor],
                                                                  LoadReport]:
    """Tensors of a torchvision weights entry, through its own API and TORCH_HOME cache."""
    entry = backbones.weights_enum(model_name, weights_name)
    path = hub_path(entry.url)
    what = f"weights {model_name}/{entry.name}"
    # torch checks the hash in the file name only when it downloads; a file already in the
    # cache (put there by anyone) is checked here, before it is read (torch's check_hash rule).
    sha = _verify_named_hash(path, what) if path.is_file() else None
    try:
        tensors = entry.get_state_dict(progress=True, check_hash=True, weights_only=True,
                                       map_location="cpu")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise FinetuneError(
            f"weights {model_name}/{entry.name}: cannot download {entry.url} ({reason}); "
            f"offline? download that file on a machine with internet and put it at {path} "
            "(torch's hub cache; set TORCH_HOME to move it)") from None
    except Exception as err:  # a damaged cached file: any type (see read_file)
        raise _unreadable(path, err) from None
    report = LoadReport(source="torchvision", path=str(path), url=entry.url,
                        sha256=sha or artifacts.file_sha256(path))
    fixed = {}
    for key, tensor in tensors.items():
        new_key = key
        for pattern, repl in backbones.key_fixes(model_name):
            new_key = re.sub(pattern, repl, new_key)
        if new_key != key:
            report.renamed[key] = new_key
        fixed[new_key] = tensor
    return fixed, report


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_file(path_str: str, source: str = "file") -> tuple[dict[str, torch.Tensor],
                                                              LoadReport]:
    """A state dict in .pth / .pt / .pkl / .bin, a Lightning .ckpt, or .safetensors.

    Pickle-based files are read with weights_only=True. A container dict is unwrapped from
    its `state_dict` / `model` / ... key, and the report names the key used.
    """
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FinetuneError(f"weights.path={path_str!r}: no such file; give the path of a state "
                            "dict (.pth / .pt / .pkl / .ckpt / .safetensors) or a run dir")
    report = LoadReport(source=source, path=str(path.resolve()),
                        sha256=artifacts.file_sha256(path))
    # A damaged file makes the readers raise almost any type (IndexError, KeyError,
    # struct.error from the legacy format's unpickler...): all mean "cannot be read". The
    # weights-only unpickler builds tensors and plain containers only, so nothing else runs.
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), report
        except Exception as err:
            raise _unreadable(path, err) from None
    try:
        inflated = safe_files.inflation_problem(path, "weights file")
        obj = None if inflated else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from None
    if inflated:
        raise FinetuneError(inflated)
    if _is_state_dict(obj):
        return obj, report
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if _is_state_dict(obj.get(key)):
                report.container = key
                return obj[key], report
    keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
    raise FinetuneError(f"weights.path={path_str!r}: no state dict found (a mapping of names to "
                        f"tensors, bare or under one of {', '.join(CONTAINER_KEYS)}); it holds: "
                        f"{keys}")


def read_hub(repo: str, revision: str | None, filename: str | None, source: str,
             what: str, pin: str | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A weights file of a Hugging Face Hub repo, through huggingface_hub's cache (offline:
    the cache alone). The report names the repo, the commit and the file's sha256."""

    path, name = hub.weights_file(repo, revision, filename, what)
    hub.check_blob(path, what)
    tensors, report = read_file(str(path), source=source)
    pin = (pin or "").lower() or None
    if pin and not (report.sha256 or "").startswith(pin):
        raise FinetuneError(f"{what}: {name} of {repo} has sha256 {report.sha256}, not "
                            f"weights.sha256={pin}; fix the pin if the file changed on purpose")
    commit = hub.commit_of(path)
    report.hub = {"repo": repo, "revision": revision or "main", "commit": commit, "file": name}
    report.url = f"https://huggingface.co/{repo}/resolve/{commit or revision or 'main'}/{name}"
    return tensors, report


def read_local_dir(path_str: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A folder holding config.json and model.safetensors (or pytorch_model.bin), as timm's
    `local-dir:` reads it."""

    found = hub.local_dir_weights(Path(path_str).expanduser())
    if found is None:
        raise FinetuneError(f"weights.path={path_str!r}: no model.safetensors or "
                            "pytorch_model.bin in it; a local_dir source is a folder as "
                            "timm saves one (config.json + model.safetensors)")
    return read_file(str(found), source="local_dir")


def read_url(url: str, sha256: str | None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Download once into finetune's cache, stored under the file's sha256 (so no URL can
    stand in for another file, or for torchvision's), checked against the pin, and load it."""
    pin = (sha256 or "").lower() or None
    path = cached_download(url, pin)
    if path is None:
        folder = downloads_dir()
        partial = folder / f".partial-{os.getpid()}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
        log.info("weights: downloading %s -> %s", url, folder)
        try:
            # Writes to a temporary file and moves it into place only when the hash matches.
            torch.hub.download_url_to_file(url, str(partial), hash_prefix=pin, progress=True)
            actual = artifacts.file_sha256(partial)
            path = folder / f"{actual}{_download_suffix(url)}"
            os.replace(partial, path)
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise FinetuneError(f"weights.url={url}: cannot download ({reason}); download it "
                                "elsewhere and use weights.source=file weights.path=FILE") from None
        except RuntimeError as err:
            raise FinetuneError(f"weights.url={url}: the download does not match "
                                f"weights.sha256={pin} ({err}); fix the pin if the file "
                                "changed on purpose") from None
        finally:
            partial.unlink(missing_ok=True)
        artifacts.write_json(_url_index(url), {"url": url, "sha256": actual})
    else:
        actual = _verify_named_hash(path, f"weights.url={url}", path.name.split(".")[0])
    if pin and not actual.startswith(pin):
        raise FinetuneError(f"weights: {path} has sha256 {actual}, not weights.sha256={pin}; "
                            "fix the pin if the file changed on purpose")
    tensors, report = read_file(str(path), source="url")
    report.url = url
    return tensors, report


def read_run(run_dir: str | Path, source: str = "run") -> tuple[dict[str, torch.Tensor],
                                                               LoadReport]:
    """The model.safetensors of a finished run of this framework, checked against its manifest."""
    manifest, weights_file = read_manifest(run_dir, key="weights.path")
    tensors, report = read_file(str(weights_file), source=source)
    report.run = {"dir": str(weights_file.parent.resolve()),
                  "recipe": manifest.recipe.get("name"), "model": manifest.model_name,
                  "class_names": manifest.class_names}
    return tensors, report


class SourceNotTrained(FinetuneError):
    """A recipe source has no run yet and training it was not allowed (inspect)."""


def read_recipe(spec: str, overrides: list[str], train: bool = True
                ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The weights another recipe produces: trained first, then reused while its resolved
    config (recipe + overrides) is unchanged. The cache key is a hash of that config.

    Raises:
        SourceNotTrained: when no run exists and `train` is False.
    """

    # Entries reach the child `python -m finetune` as argv: each must be one key=value of a
    # schema key, whoever wrote it (a recipe, a run dir's config, the command line).
    problems = [p for i, entry in enumerate(overrides)
                for p in gate.override_problems(entry, f"weights.recipe_overrides[{i}]")]
    if problems:
        raise ConfigError(problems)
    name, path = locations.resolve_recipe(spec)
    chain = [p for p in os.environ.get(_CHAIN_ENV, "").split(os.pathsep) if p]
    if str(path) in chain:
        raise FinetuneError(f"weights.recipe={spec}: recipes take weights from each other in a "
                            f"cycle ({' -> '.join([*chain, str(path)])})")
    args = [f"recipe={path}", *overrides]
    # A job of its own: not the launch time or the recipe table of the run that needs it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("FINETUNE_LAUNCHED", "FINETUNE_RUN_RECIPES")}
    env[_CHAIN_ENV] = os.pathsep.join([*chain, str(path)])
    key = _composed_key(spec, args, env, path)
    run_dir = sources_dir() / f"{name}-{key}"
    # Runs that need the same source at once: the first trains it, the others wait and reuse.
    with artifacts.lock_run_dir(sources_dir(), wait=True, name=f".{name}-{key}.lock"):
        _train_or_reuse(spec, name, key, run_dir, args, env, train)
    tensors, report = read_run(run_dir, source="recipe")
    report.run = {**(report.run or {}), "recipe": name, "config_sha256": key}
    return tensors, report


# The composed source config's key, per process: the jobs of a sweep ask for the same source
# with the same arguments, and composing it is a child interpreter (most of a job's own time).
# Remembered only while every file it can read is as it was (recipe folders and conf/).
_COMPOSED: dict[tuple[Any, ...], str] = {}


def _inputs_state(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Path, size and modification time of every YAML a recipe's composition can read."""
    folders = {path.parent, *locations.recipe_dirs(), locations.CONF_DIR}
    found = []
    for folder in sorted(folders):
        for file in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            stat = file.stat()
            found.append((str(file), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def _composed_key(spec: str, args: list[str], env: dict[str, str], path: Path) -> str:
    """The hash of the source recipe's resolved config (`python -m finetune ARGS --cfg job
    --resolve`, in a child process as a job of its own), computed once per process for the
    same arguments, environment and recipe files."""
    memo = (tuple(args), tuple(sorted(env.items())), _inputs_state(path))
    if memo in _COMPOSED:
        return _COMPOSED[memo]
    composed = subprocess.run([sys.executable, "-m", "finetune", *args, "--cfg", "job",
                               "--resolve"], capture_output=True, text=True, env=env)
    if composed.returncode:
        raise FinetuneError(f"weights.recipe={spec}: the source recipe does not compose: "
                            f"{composed.stderr.strip().splitlines()[-1]}")
    _COMPOSED[memo] = key = hashlib.sha256(composed.stdout.encode()).hexdigest()[:12]
    return key


def _train_or_reuse(spec: str, name: str, key: str, run_dir: Path, args: list[str],
                    env: dict[str, str], train: bool) -> None:
    """Leave a verified run of the source recipe in `run_dir`: the one there, or a new one."""
    if _is_complete(run_dir) and _source_verified(run_dir, key):
        log.info("weights: reusing %s (recipe %s, same resolved config)", run_dir, name)
        return
    if not train:
        raise SourceNotTrained(f"weights.recipe={spec}: no run of it with this config yet; a "
                               f"training run trains it first, into {run_dir}")
    log.info("weights: training recipe %s first -> %s", name, run_dir)
    trained = subprocess.run([sys.executable, "-m", "finetune", *args,
                              f"hydra.run.dir={run_dir}"], env=env)
    if trained.returncode or not _is_complete(run_dir):
        raise FinetuneError(f"weights.recipe={spec}: training the source recipe failed; "
                            f"see {run_dir}")
    manifest, _ = read_manifest(run_dir, key="weights.recipe")
    artifacts.write_json(run_dir / SOURCE_RECORD, {
        "recipe": name, "config_sha256": key, "model_sha256": manifest.model_sha256})


def _is_complete(run_dir: Path) -> bool:
    metrics = run_dir / artifacts.METRICS
    return metrics.is_file() and artifacts.read_json(metrics).get("status") == "complete"


def _source_verified(run_dir: Path, key: str) -> bool:
    """A source run is reused only when the record its trainer wrote names this config and
    the weights it holds now (manifest and file sha256 agree); otherwise it is trained again."""
    record = run_dir / SOURCE_RECORD
    if not record.is_file():
        return False
    entry = safe_files.load_json_object(record, "source record")
    try:
        manifest, _ = read_manifest(run_dir, key="weights.recipe")
    except FinetuneError:
        return False
    ok = entry.get("config_sha256") == key and entry.get("model_sha256") == manifest.model_sha256
    if not ok:
        log.warning("weights: %s does not match its source record; training it again", run_dir)
    return ok


