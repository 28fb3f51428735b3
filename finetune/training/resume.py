"""Continuing a run: which checkpoint `resume=` names, and whether it fits this run (its layout,
finite tensors, the model's tensors, the optimizer's groups, the schedule's end) before
Lightning restores it."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from finetune.compose import safe_files
from finetune.errors import FinetuneError
from finetune.registry import make_optimizer
from finetune.rundir import artifacts
from finetune.training.lightning_module import FinetuneModule
from finetune.training.optim import torch_groups
from finetune.training.schedules import SCHEDULES

log = logging.getLogger("finetune")


def resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """`resume`: null; auto (this run dir's last.ckpt, when there is one); a .ckpt file; or
    a run dir (its checkpoints/last.ckpt)."""
    if resume is None:
        return None
    if resume == "auto":
        found = run_dir / artifacts.CHECKPOINTS / artifacts.LAST_CHECKPOINT
        if found.is_file():
            return found
        log.info("resume=auto: no checkpoint in %s yet; starting from the beginning",
                 found.parent)
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        for candidate in (path / artifacts.CHECKPOINTS / artifacts.LAST_CHECKPOINT,
                          path / artifacts.LAST_CHECKPOINT):
            if candidate.is_file():
                return candidate
        raise FinetuneError(f"resume={resume}: no checkpoints/last.ckpt in that folder; give a "
                            "run dir, a .ckpt file, or auto")
    if not path.is_file():
        raise FinetuneError(f"resume={resume}: no such file or run dir (relative paths start at "
                            f"{Path.cwd()})")
    return path


def check_resumable(path: Path, module: FinetuneModule, max_epochs: int | None = None,
                    ema: bool = False) -> tuple[list[str], list[list[str]]]:
    """The checkpoint must be of this model and this optimizer layout; then the run dir gets
    its metrics history up to the checkpoint's epoch, so curves and best epochs span both.
    Returns that history (header, rows), read now: the run dir may be the same one. Warns
    when the run would go on past the end of the schedule it resumes (at a learning rate of
    about 0)."""
    try:
        inflated = safe_files.inflation_problem(path, f"resume={path}: the checkpoint")
        saved = None if inflated else torch.load(path, map_location="cpu", weights_only=True,
                                                 mmap=True)
    except Exception as err:
        raise FinetuneError(f"resume={path}: cannot read the checkpoint "
                            f"({' '.join(str(err).split())[:200]})") from None
    if inflated:
        raise FinetuneError(inflated)
    if isinstance(saved, dict) and "state_dict" in saved and "optimizer_states" not in saved:
        raise FinetuneError(f"resume={path}: the checkpoint holds weights only (best.ckpt, or "
                            "checkpoint.optimizer=false), not the optimizer and schedule a "
                            "resume continues; start a new run from its weights instead "
                            f"(weights.source=file weights.path={path})")
    if not isinstance(saved, dict) or "finetune" not in saved or "state_dict" not in saved:
        raise FinetuneError(f"resume={path}: not a checkpoint written by finetune (no "
                            "'finetune' entry); resume from a run's checkpoints/last.ckpt")
    written_with_ema = "current_model_state" in saved
    if written_with_ema and not ema:
        raise FinetuneError(f"resume={path}: the checkpoint was written with model.ema (its "
                            "state_dict is the EMA, the live weights are kept apart); resume "
                            "with the same model.ema.decay, or start a new run from its EMA "
                            f"weights (weights.source=file weights.path={path})")
    damaged = checkpoint_damage(saved)
    if damaged:
        raise FinetuneError(f"resume={path}: the checkpoint is damaged ({damaged}); resume "
                            "from another one (checkpoints/last.ckpt of the run), or start anew")
    ours = module.state_dict()
    theirs = saved["state_dict"]
    differ = sorted(k for k in set(ours) | set(theirs)
                    if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    if differ:
        raise FinetuneError(f"resume={path}: the checkpoint is of another model ({len(differ)} "
                            f"tensors differ, e.g. {differ[0]}); resume with the recipe and "
                            "overrides it was trained with (rerun=RUN_DIR resume=RUN_DIR)")
    stages = int(saved["finetune"]["stages"])
    expected = [g.name for g in module.groups if g.stage < stages]
    if expected != list(saved["finetune"]["groups"]):
        raise FinetuneError(f"resume={path}: the optimizer groups differ (checkpoint: "
                            f"{', '.join(saved['finetune']['groups'])}; this config: "
                            f"{', '.join(expected)}); resume with the freeze and optim settings "
                            "it was trained with")
    mismatch = optimizer_state_problem(saved["optimizer_states"], module, stages)
    if mismatch:
        raise FinetuneError(f"resume={path}: the checkpoint is damaged ({mismatch}); resume "
                            "from another one (checkpoints/last.ckpt of the run), or start anew")
    progress = saved.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    whole = bool(progress.get("is_last_batch", True))  # saved at the end of an epoch
    epoch, step = int(saved["epoch"]), int(saved.get("global_step", 0))
    where = (f"epoch {epoch} done, step {step}" if whole else
             f"stopped in epoch {epoch} after {progress.get('current', {}).get('completed', '?')}"
             f" of its batches, step {step}")
    log.info("resume: from %s (%s; %d freeze stages begun)", path, where, stages)
    ended = schedule_end(saved, epoch + 1 if whole else epoch)
    if ended is not None and max_epochs is not None and max_epochs > ended[1]:
        name, length = ended
        log.warning(
            "resume: the checkpoint's %s schedule ended with epoch %d (its length, "
            "sched.epochs or the first run's trainer.max_epochs, is kept on resume): epochs "
            "%d..%d would train at a learning rate of about 0. To train them, start a fresh "
            "schedule from its weights instead (the same recipe with weights.source=run "
            "weights.path=%s trainer.max_epochs=%d); to stop a run early and extend it later, "
            "give it its full length at the start (sched.epochs=N)", name, length - 1,
            length, max_epochs - 1, path.parent.parent, max_epochs - length)
    return artifacts.metrics_history(path.parent.parent / artifacts.METRICS_CSV,
                                     int(saved["epoch"]))


def checkpoint_damage(saved: dict[str, Any]) -> str | None:
    """What is wrong with the layout of a checkpoint finetune wrote (None: nothing), checked
    before anything of it is used: each entry a resume reads, with its type."""
    ours = saved.get("finetune")
    if not isinstance(ours, dict) or not _whole(ours.get("stages")) or not (
            isinstance(ours.get("groups"), list) and all(isinstance(g, str)
                                                         for g in ours["groups"])):
        return "its 'finetune' entry lacks the stages count or the optimizer group names"
    state = saved["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return "its state_dict is not a mapping of names to tensors"
    missing = [k for k in ("epoch", "global_step") if not _whole(saved.get(k))]
    if missing:
        return f"no whole-number {' or '.join(missing)}"
    optimizers = saved.get("optimizer_states")
    if not isinstance(optimizers, list) or not all(
            isinstance(o, dict) and isinstance(o.get("state"), dict)
            and isinstance(o.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in o["param_groups"]) for o in optimizers):
        return "its optimizer_states are not optimizer state dicts"
    if not all(isinstance(v, dict) for o in optimizers for v in o["state"].values()):
        return "an optimizer's per-parameter state is not a mapping"
    tensors = [*state.items(), *((f"optimizer state {k}", t) for o in optimizers
                                 for v in o["state"].values() for k, t in v.items()
                                 if isinstance(t, torch.Tensor))]
    bad = [k for k, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return f"{len(bad)} tensors hold NaN or infinity, e.g. {', '.join(bad[:3])}"
    for key, kind in (("loops", dict), ("lr_schedulers", list), ("callbacks", dict)):
        if key in saved and not isinstance(saved[key], kind):
            return f"its {key} entry is a {type(saved[key]).__name__}, not a {kind.__name__}"
    if not all(isinstance(s, dict) for s in saved.get("lr_schedulers", [])):
        return "a learning-rate schedule's state is not a mapping"
    node: Any = saved.get("loops", {})
    for key in ("fit_loop", "epoch_loop.batch_progress", "current"):
        node = node.get(key, {})
        if not isinstance(node, dict):
            return f"its loop state {key} is a {type(node).__name__}"
    return None


def optimizer_state_problem(states: list[dict[str, Any]], module: FinetuneModule,
                            stages: int) -> str | None:
    """Whether the saved optimizer state fits this run's optimizer: the same groups of the
    same sizes, and per parameter the entries this optimizer keeps (found by stepping it
    once on a probe parameter), each of the parameter's shape. Lightning would load a
    mismatch silently and fail at the first step."""

    if len(states) != 1:
        return f"{len(states)} optimizer states, not 1"
    probe = nn.Parameter(torch.zeros(2))
    probe.grad = torch.zeros(2)
    stepped = make_optimizer(module.optim_cfg, [probe])
    stepped.step()
    expected = sorted(stepped.state[probe])
    groups = torch_groups([g for g in module.groups if g.stage < stages], module.model)
    saved_groups = states[0]["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if [len(g["params"]) for g in saved_groups] != sizes:
        return f"its optimizer groups hold {[len(g['params']) for g in saved_groups]} " \
               f"parameters, this run's {sizes}"
    shapes = {pid: p.shape for saved, ours in zip(saved_groups, groups, strict=True)
              for pid, p in zip(saved["params"], ours["params"], strict=True)}
    for pid, entry in states[0]["state"].items():
        if pid not in shapes:
            return f"optimizer state for parameter {pid!r}, which no group holds"
        if sorted(entry) != expected:
            return (f"the optimizer state of parameter {pid} holds {', '.join(map(str, entry))}"
                    f", not {', '.join(expected)}")
        wrong = [k for k, t in entry.items() if isinstance(t, torch.Tensor) and t.dim() > 0
                 and t.shape != shapes[pid]]
        if wrong:
            return (f"the optimizer's {wrong[0]} of parameter {pid} has shape "
                    f"{list(entry[wrong[0]].shape)}, the parameter {list(shapes[pid])}")
    return None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def schedule_end(saved: dict[str, Any], next_epoch: int) -> tuple[str, int] | None:
    """(schedule name, its length in epochs) when the checkpoint's schedule has decayed to
    about 0 by `next_epoch`, else None (it still moves, or never ends: none, step, plateau)."""


    state = (saved.get("lr_schedulers") or [{}])[0]
    shape = SCHEDULES.get(str(state.get("name")))
    if shape is None or not isinstance(state.get("epochs"), int):
        return None
    schedule = SimpleNamespace(**state)
    t = next_epoch if shape.owns_warmup else next_epoch - int(state.get("warmup", 0))
    if next_epoch < state["epochs"] or t < 0 or shape.factor(schedule, float(t)) > 1e-3:
        return None
    return shape.name, int(state["epochs"])
