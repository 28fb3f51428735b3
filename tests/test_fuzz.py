"""Every file we read from outside, damaged: random bytes, cut short, bits flipped. Each must
either read (a flipped bit in tensor data is still a valid file) or be refused with a
FinetuneError of one-line sentences naming the file: what the CLIs print after
`error:` with exit 2. Never another exception (a traceback), and a damaged checkpoint that
passes the resume check must resume. Seeded: the same files on every run."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    QUICK,
    SHRINK,
    main_here,
    problems_here,
    train_here,
    write_digit_images,
)
from safetensors.torch import save_file
from torch import nn

import finetune
from finetune.compose.prepare import compose_with_hydra
from finetune.data.csv_lists import CsvProblem, read_csv_rows
from finetune.errors import FinetuneError
from finetune.training.lightning_module import FinetuneModule
from finetune.training.plan import plan_run
from finetune.training.resume import check_resumable
from finetune.weights.readers import read_file

PER_KIND = 120
RUN = [*QUICK, *SHRINK, "model.name=squeezenet1_1", "checkpoint.keep=last"]  # 9 MB last.ckpt


def damaged(good: bytes, seed: int, n: int = PER_KIND) -> Iterator[tuple[str, bytes]]:
    """n damaged copies of `good`: a third random bytes, a third cut at a random length, a
    third with 1-8 bits flipped, mostly where a format keeps its structure (the first and
    last 64 KiB: headers, pickle, zip directory), sometimes anywhere."""
    rng = random.Random(seed)
    for i in range(n):
        if i % 3 == 0:
            yield "random", rng.randbytes(rng.choice([0, 1, 7, 100, 4000]))
        elif i % 3 == 1:
            yield "cut", good[:rng.randrange(len(good))]
        else:
            data = bytearray(good)
            edge = min(len(data), 1 << 16)
            for _ in range(rng.choice([1, 2, 8])):
                where = rng.random()
                pos = (rng.randrange(edge) if where < 0.45 else
                       len(data) - 1 - rng.randrange(edge) if where < 0.9 else
                       rng.randrange(len(data)))
                data[pos] ^= 1 << rng.randrange(8)
            yield "flipped", bytes(data)


def fuzz(good: Path, seed: int, read: Callable[[Path], object]) -> dict[str, int]:
    """Write each damaged copy over a file named like `good` and read it; returns how many
    were read and refused (a failure names the damage that escaped)."""
    data = good.read_bytes()
    target = good.with_name(f"damaged{good.suffix}") if good.name != "manifest.json" else good
    counts = {"read": 0, "refused": 0}
    for i, (kind, blob) in enumerate(damaged(data, seed)):
        target.write_bytes(blob)
        try:
            read(target)
            counts["read"] += 1
        except FinetuneError as err:
            assert err.problems and all(p and "\n" not in p for p in err.problems), err.problems
            counts["refused"] += 1
        except Exception as err:  # the bug this test is for
            kept = good.with_name(f"escaped-{i}{good.suffix}")
            kept.write_bytes(blob)
            raise AssertionError(f"{kind} copy {i} of {good.name} (kept at {kept}) raised "
                                 f"{type(err).__name__}: {err}") from err
    target.write_bytes(data)
    return counts


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_here(*RUN, run_dir=tmp_path_factory.mktemp("fuzz") / "run")


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".safetensors"])
def test_damaged_weight_files(tmp_path: Path, suffix: str) -> None:
    """A state dict, a Lightning checkpoint (the container unwrapped), a safetensors file."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    state = model.state_dict()
    good = tmp_path / f"good{suffix}"
    if suffix == ".safetensors":
        save_file(state, good)
    else:
        torch.save(state if suffix == ".pth" else {
            "state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3,
            "hyper_parameters": {"lr": 0.1}}, good)
    read_file(str(good))  # the undamaged file reads
    counts = fuzz(good, seed=len(suffix), read=lambda p: read_file(str(p)))
    assert counts["refused"] >= PER_KIND * 2 // 3, counts  # every random and cut copy at least


RECORDED_ONLY = ("config", "versions", "recipe", "overrides", "freeze", "weights", "created",
                 "resumed_from", "seed")  # what a run was, not what rebuilds it


def tampered(node: Any, skip: tuple[str, ...] = RECORDED_ONLY) -> Iterator[tuple[str, Any]]:
    """Valid JSON that is not the manifest written: every key (but those only recorded)
    deleted, and every value (of a list, the first) replaced by each of a few values of
    other types, one at a time; (where, the whole changed object)."""
    import copy

    def paths(value: Any, at: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        children = (value.items() if isinstance(value, dict) else
                    list(enumerate(value))[:1] if isinstance(value, list) else [])
        for key, child in children:
            if not at and key in skip:
                continue
            yield (*at, key)
            yield from paths(child, (*at, key))

    for path in list(paths(node, ())):
        for replacement in ("delete", None, "x", -1, 2.5, True, [], {}):
            changed = copy.deepcopy(node)
            parent = changed
            for key in path[:-1]:
                parent = parent[key]
            if replacement == "delete":
                if isinstance(parent, list):
                    continue
                del parent[path[-1]]
            else:
                parent[path[-1]] = replacement
            yield f"{'.'.join(map(str, path))}={replacement!r}", changed


def test_damaged_and_tampered_manifests(run: Path, tmp_path: Path) -> None:
    """finetune.load (predict, export and weights.source=run read a manifest this way):
    damaged bytes, and valid JSON with any field removed or of another type."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    manifest = copy / "manifest.json"
    counts = fuzz(manifest, seed=7, read=finetune.load)
    assert counts["refused"] >= PER_KIND * 2 // 3, counts
    original = json.loads(manifest.read_text())
    refused = 0
    for where, changed in tampered(original):
        manifest.write_text(json.dumps(changed))
        try:
            finetune.load(copy)
        except FinetuneError as err:
            assert all(p and "\n" not in p for p in err.problems), err.problems
            refused += 1
        except Exception as err:
            raise AssertionError(f"a manifest with {where} raised {type(err).__name__}: "
                                 f"{err}") from err
    assert refused > 100, refused


def test_damaged_checkpoints_to_resume(run: Path, tmp_path: Path) -> None:
    """A checkpoint that passes the resume check resumes: the check reads every entry a
    resume uses, including the optimizer state's names and shapes (a flipped letter in
    `exp_avg_sq` once passed and crashed at the first step)."""
    cfg = compose_with_hydra(RUN)
    plan = plan_run(cfg)
    plan.raise_problems()
    assert plan.built is not None and plan.freeze is not None and plan.class_names
    module = FinetuneModule(plan.built.model, len(plan.class_names), plan.freeze, cfg.optim,
                            cfg.sched, groups=plan.groups)
    good = tmp_path / "last.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", good)
    check_resumable(good, module)
    passed: list[bytes] = []

    def read(path: Path) -> None:
        check_resumable(path, module)
        passed.append(path.read_bytes())

    counts = fuzz(good, seed=11, read=read)
    assert counts["refused"] >= PER_KIND * 2 // 3, counts
    # what a flip inside a name or a shape does, made on purpose
    saved = torch.load(good, weights_only=True)
    entry = saved["optimizer_states"][0]["state"][0]
    entry["exp_avg_sr"] = entry.pop("exp_avg_sq")
    torch.save(saved, tmp_path / "renamed.ckpt")
    with pytest.raises(FinetuneError, match=r"the optimizer state of parameter 0 holds step, "
                                            r"exp_avg, exp_avg_sr, not exp_avg, exp_avg_sq, step"):
        check_resumable(tmp_path / "renamed.ckpt", module)
    entry["exp_avg_sq"] = entry.pop("exp_avg_sr")[:1]
    torch.save(saved, tmp_path / "reshaped.ckpt")
    with pytest.raises(FinetuneError, match=r"the optimizer's exp_avg_sq of parameter 0 has "
                                            r"shape \[1"):
        check_resumable(tmp_path / "reshaped.ckpt", module)
    for i, blob in enumerate(passed[:1]):  # an accepted one really resumes (it trains)
        again = tmp_path / f"again{i}"
        (again / "checkpoints").mkdir(parents=True)
        (again / "checkpoints" / "last.ckpt").write_bytes(blob)
        assert finetune.train("quickstart", [*RUN[1:], "trainer.max_epochs=2", "resume=auto"],
                              run_dir=again).metrics["status"] == "complete"


def test_damaged_csv_lists(tmp_path: Path) -> None:
    written = write_digit_images(tmp_path / "imgs", [1, 2], 3)
    good = tmp_path / "labels.csv"
    good.write_text("path,label\n" + "".join(f"imgs/{d}/{p.name},{d}\n"
                                             for d, ps in written.items() for p in ps))

    def read(path: Path) -> None:
        try:
            read_csv_rows(path)
        except CsvProblem as err:
            raise FinetuneError(str(err)) from None

    counts = fuzz(good, seed=13, read=read)
    assert counts["refused"] >= PER_KIND // 3, counts


def test_the_clis_say_it_in_one_line(run: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Through the commands: one `error:` line (a random-bytes .pth; a cut resume
    checkpoint), and for predict exit 2 and no traceback (a cut manifest). (That a refused
    run exits 2 without a traceback in a real process: test_train_e2e, test_bad_inputs.)"""
    junk = tmp_path / "junk.pth"
    junk.write_bytes(random.Random(0).randbytes(100))
    errors = problems_here(*QUICK[:1], "weights.source=file", f"weights.path={junk}", *SHRINK)
    assert len(errors) == 1 and f"weights file {junk} cannot be read" in errors[0]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    manifest = copy / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    code, _, err = main_here("predict", f"run={copy}", f"input={tmp_path}",
                             capsys=capsys)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert f"manifest {manifest}: not valid JSON" in err
    last = copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    problems = problems_here(*RUN, f"resume={last}", run_dir=tmp_path / "resumed")
    assert len(problems) == 1 and problems[0].startswith(f"resume={last}: cannot read the "
                                                         "checkpoint")
