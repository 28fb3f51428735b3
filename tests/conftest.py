"""Shared fixtures: real image files from the digits, a temporary TORCH_HOME, the real CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits

from finetune.models.detectors import FROZEN_BN_PRETRAINED

REPO = Path(__file__).resolve().parents[1]

# Each pytest-xdist worker computes on one thread (and so do the processes it starts): with
# torch's default of one thread per core, the workers' threads oversubscribe the cores and
# spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Shrinks any recipe to a few seconds on 2 CPU cores.
SHRINK = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
    "checkpoint.keep=none",  # model.safetensors only (a test about checkpoints says so)
    "eval.report=false",  # no report.html (tests/test_report_html.py builds and opens them)
]


# Test files by their measured time on 2 cores (`pytest --durations=0`, summed per file),
# slowest first. pytest-xdist hands out whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder): the slow ones start first and the quick ones fill the tail, so
# neither worker idles at the end. Files not listed run after these, in their usual order.
SLOW_FIRST = ["test_study.py", "test_sharing.py", "test_plugins.py", "test_train_e2e.py",
              "test_bad_inputs.py",
              "test_use.py", "test_bench.py", "test_sweeps.py", "test_recipes.py", "test_timm.py",
              "test_heads.py", "test_evaluation.py",
              "test_freeze_training.py", "test_config.py", "test_resume.py", "test_gate.py",
              "test_cache.py", "test_fuzz.py", "test_imbalance.py", "test_stopping.py",
              "test_mixing.py", "test_kfold.py", "test_ema.py", "test_multilabel.py",
              "test_property.py", "test_ddp.py", "test_report_html.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, module: str = "finetune"
            ) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def run_console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The `finetune` console script pip installed beside this interpreter, in a subprocess."""
    script = Path(sys.executable).parent / "finetune"
    assert script.is_file(), f"no console script {script}: pip install -e . installs it"
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def train_here(*args: str, run_dir: Path) -> Path:
    """`finetune.train` in this process, arguments as on the command line (`recipe=` among
    them); returns the run dir. No interpreter start: for tests about the run, not the CLI."""
    import finetune

    recipe = next((a.partition("=")[2] for a in args if a.startswith("recipe=")), "base")
    overrides = [a for a in args if not a.startswith("recipe=")]
    return finetune.train(recipe, overrides, run_dir=run_dir).run_dir


def problems_here(*args: str, run_dir: Path | None = None) -> list[str]:
    """The problems `python -m finetune ARGS` would print (one per `finetune: error:` line),
    from finetune.train in this process: the same gate, composition and plan. For tests
    about a message; a few true CLI tests check the exit status and the absent traceback."""
    import finetune
    from finetune.errors import FinetuneError

    recipe = next((a.partition("=")[2] for a in args if a.startswith("recipe=")), "base")
    overrides = [a for a in args if not a.startswith("recipe=")]
    with pytest.raises(FinetuneError) as stopped:
        finetune.train(recipe, overrides, run_dir=run_dir)
    return stopped.value.problems


def main_here(command: str, *args: str, capsys: pytest.CaptureFixture[str]
              ) -> tuple[int, str, str]:
    """`finetune COMMAND ARGS` (predict, export, inspect, recipes, report, evaluate) in this
    process, through the same front door as the console script: (exit status, stdout,
    stderr)."""
    from finetune.commands import main

    capsys.readouterr()
    try:
        main([command, *args])
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def ranked_leaderboard(sweep: Path, metric: str, capsys: pytest.CaptureFixture[str]
                       ) -> list[dict[str, str]]:
    """`finetune report SWEEP` in this process: it says it ranked the jobs by `metric`
    (val/map, val/miou...), the leaderboard lists them best first, and each row's figure and
    split point are its job's own. The leaderboard's rows."""
    code, out, err = main_here("report", str(sweep), capsys=capsys)
    assert code == 0 and f"ranked by {metric}" in out, err
    with open(sweep / "leaderboard.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    column = metric.replace("/", "_")
    assert {f"best_{column}", column} <= set(rows[0])
    values = [float(r[column]) for r in rows]
    assert values == sorted(values, reverse=True)
    for row in rows:  # each figure is its job's
        job = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row[column]) == pytest.approx(job[metric], abs=1e-4)
        assert row["train_from"] == job["train_from"]
    return rows


def cli_errors(result: subprocess.CompletedProcess, prefix: str = "finetune: error:"
               ) -> list[str]:
    """The error lines of a run that failed as a user error must: exit 2, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if line.startswith(prefix)]


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    """The run dir a successful run printed in its summary (the last one printed: a recipe
    source trained first prints its own before)."""
    for line in reversed(result.stdout.splitlines()):
        if line.strip().startswith("run dir:"):
            return Path(line.split("run dir:", 1)[1].strip())
    raise AssertionError(f"no run dir in output:\n{result.stdout}\n{result.stderr}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_digit_images(root: Path, classes: list[int], per_class: int, mode: str = "L",
                       start: int = 0) -> dict[int, list[Path]]:
    """Real PNGs of scikit-learn's digits: root/<digit>/<i>.png, 8x8 upscaled to 16x16
    (`start`: skip that many images of each digit, for disjoint splits)."""
    digits = load_digits()
    written: dict[int, list[Path]] = {}
    for digit in classes:
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        index = np.flatnonzero(digits.target == digit)[start:start + per_class]
        for i in index:
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((16, 16), Image.NEAREST)
            path = folder / f"{i}.png"
            image.convert(mode).save(path)
            written.setdefault(digit, []).append(path)
    return written


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of three digit classes, in grayscale, RGB and RGBA PNGs."""
    root = tmp_path_factory.mktemp("digits_png")
    write_digit_images(root, [0], 30, mode="L")
    write_digit_images(root, [1], 30, mode="RGB")
    write_digit_images(root, [2], 30, mode="RGBA")
    return root


@pytest.fixture(scope="session", autouse=True)
def finetune_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$FINETUNE_HOME (recipe sources, URL downloads, trusted_weights.txt) for the session,
    inherited by every CLI run: the tests never touch the user's ~/.cache/finetune."""
    home = tmp_path_factory.mktemp("finetune_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_HOME", str(home))
        yield home


def trust_weights_file(path: Path) -> None:
    """Vouch for a weights file we made (random weights under torchvision's name): its sha256
    goes into $FINETUNE_HOME/trusted_weights.txt, as a user who placed their own file would."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    listing = Path(os.environ["FINETUNE_HOME"]) / "trusted_weights.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    with open(listing, "a") as handle:
        handle.write(f"{digest}  # {path.name}, made by the tests\n")


def save_torchvision_checkpoint(torch_home: Path, model_name: str, weights: str = "DEFAULT",
                                trust: bool = True, **kwargs: object
                                ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A state dict (random weights, no accuracy) under torchvision's own cache file name;
    its hash cannot match the one in the name, so (unless `trust` is False) it is listed in
    trusted_weights.txt."""
    entry = torchvision.models.get_model_weights(model_name)[weights]
    path = torch_home / "hub" / "checkpoints" / Path(entry.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    state = torchvision.models.get_model(model_name, weights=None, **kwargs).state_dict()
    if model_name in FROZEN_BN_PRETRAINED:
        # the published file is of the model its builder makes for pretrained weights:
        # FrozenBatchNorm2d in the backbone, which has no num_batches_tracked
        # (statistics of its own, so that a test can tell them from a new layer's)
        state = {k: (v.uniform_(0.5, 1.5) if k.endswith(("running_var", "running_mean"))
                     and k.startswith("backbone.body.") else v) for k, v in state.items()
                 if not (k.startswith("backbone.body.") and k.endswith(".num_batches_tracked"))}
    torch.save(state, path)
    if trust:
        trust_weights_file(path)
    return path, state


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TORCH_HOME with resnet18 (DEFAULT) and resnet50 (IMAGENET1K_V2) checkpoints."""
    home = tmp_path_factory.mktemp("torch_home")
    save_torchvision_checkpoint(home, "resnet18")
    save_torchvision_checkpoint(home, "resnet50", "IMAGENET1K_V2")
    return home


@pytest.fixture(scope="session")
def torch_home_vgg(torch_home: Path) -> Path:
    """torch_home plus vgg16 (IMAGENET1K_V1, 528 MB), deeplabv3_resnet50
    (COCO_WITH_VOC_LABELS_V1, 161 MB) and maskrcnn_resnet50_fpn (COCO_V1, 170 MB), so only
    for the tests that need them."""
    save_torchvision_checkpoint(torch_home, "vgg16", "IMAGENET1K_V1")
    save_torchvision_checkpoint(torch_home, "deeplabv3_resnet50", "COCO_WITH_VOC_LABELS_V1",
                                aux_loss=True, weights_backbone=None)
    save_torchvision_checkpoint(torch_home, "maskrcnn_resnet50_fpn", "COCO_V1",
                                weights_backbone=None)
    return torch_home


# The quickstart without its recipe source, for tests about something else.
QUICK = ["recipe=quickstart", "weights.source=none"]


def write_hub_repo(hf_home: Path, repo: str, files: dict[str, object],
                   revision: str = "main", commit: str | None = None) -> Path:
    """A Hugging Face Hub repo in huggingface_hub's own cache layout under `hf_home`:
    hub/models--org--name/snapshots/<commit>/<file> and refs/<revision> naming the commit.
    `files` maps names to a state dict (written as safetensors) or a JSON-able dict."""
    from safetensors.torch import save_file

    commit = commit or hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    blobs = folder / "blobs"
    blobs.mkdir(exist_ok=True)
    for name, content in files.items():
        assert isinstance(content, dict)
        if name.endswith(".safetensors"):  # an LFS file: blobs/<sha256>, linked from snapshots
            staged = blobs / "incoming"
            save_file({k: v.contiguous() for k, v in content.items()}, staged)
            blob = blobs / hashlib.sha256(staged.read_bytes()).hexdigest()
            staged.replace(blob)
            (snapshot / name).unlink(missing_ok=True)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            (snapshot / name).write_text(json.dumps(content))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


def timm_state(name: str, seed: int = 1, **kwargs: object) -> dict[str, torch.Tensor]:
    """Random weights (no accuracy) of a timm architecture, as its Hub file holds them."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).state_dict()


def write_timm_weights(hf_home: Path, name: str, tag: str, seed: int = 1
                       ) -> tuple[Path, dict[str, torch.Tensor]]:
    """timm's pretrained file for NAME.TAG (random weights) where timm's Hub repo caches it."""
    state = timm_state(name, seed)
    snapshot = write_hub_repo(hf_home, f"timm/{name}.{tag}", {"model.safetensors": state})
    return snapshot / "model.safetensors", state


def use_hub_cache(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME = `home`, HF_HUB_OFFLINE=1: the Hub is never asked, only that cache read."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def hub_cache(tmp_path_factory: pytest.TempPathFactory, name: str,
              weights: list[tuple[str, str]]) -> Path:
    home = tmp_path_factory.mktemp(name)
    for arch, tag in weights:
        write_timm_weights(home, arch, tag)
    return home


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache with timm's test_vit / test_resnet / test_convnext weights
    (r160_in1k, random) in the Hub's layout."""
    return hub_cache(tmp_path_factory, "hf_home", [(n, "r160_in1k") for n in (
        "test_vit", "test_resnet", "test_convnext")])


@pytest.fixture
def offline_hub(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_hub_cache(hf_home, monkeypatch)


# timm weights the shipped recipes name (random, in the Hub cache's layout)
RECIPE_TIMM_WEIGHTS = [("convnext_tiny", "fb_in22k_ft_in1k"),
                       ("vit_small_patch16_224", "augreg_in21k_ft_in1k")]


@pytest.fixture(scope="session")
def recipes_hub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written once for the session's xdist workers (they share the base temp dir's parent;
    a file lock makes the second wait for the first): 200 MB of random weights."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    home = shared / "recipes_hf"
    with FileLock(str(shared / "recipes_hf.lock")):
        if not (home / "complete").is_file():
            shutil.rmtree(home, ignore_errors=True)
            for arch, tag in RECIPE_TIMM_WEIGHTS:
                write_timm_weights(home, arch, tag)
            (home / "complete").write_text("")
    return home


@pytest.fixture
def recipes_hub(recipes_hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME with the shipped recipes' timm weights, HF_HUB_OFFLINE=1."""
    return use_hub_cache(recipes_hub_home, monkeypatch)
