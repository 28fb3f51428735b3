"""Adapters (LoRA, DoRA) on a built model, through Hugging Face peft: which layers get one, as
data (`AdapterPlan`); putting them in (`inject`); the small file a run keeps
(`adapter_state`); and merging them into the layers they adapt (`merged_copy`), so the saved
model is the plain architecture that predict, evaluate and export already rebuild.

peft is an optional extra (`pip install 'finetune[adapters]'`) and slow to import (it brings
transformers): it is imported only when a run declares `adapter.type`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finetune.errors import ConfigError, FinetuneError
from finetune.models.selectors import as_list, describe, inside, select_modules

ADAPTER_TYPES = ("lora", "dora")
# The layer types an adapter goes on (what peft adapts and this project tests; a grouped
# or depthwise convolution is refused: peft cannot merge its adapter in general).
ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
# peft's parameter names: <layer>.lora_A.default.weight, <layer>.lora_B.default.weight and,
# for DoRA, <layer>.lora_magnitude_vector.default.weight
ADAPTER_PART = re.compile(r"(^|\.)lora_[A-Za-z_]+\.")
MAGNITUDE = "*lora_magnitude_vector*"  # DoRA's scales: no weight decay, as peft advises
ADAPTER_NAME = "default"


@dataclass
class AdapterPlan:
    """The adapter of a run as data: each adapted layer with its rank and alpha, the modules
    trained fully beside them (the head first), and the adapter parameters' learning rate."""

    type: str
    targets: dict[str, tuple[int, float]]  # module path -> (rank, alpha)
    dropout: float
    train_fully: list[str]
    lr: float | None = None
    selectors: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ranks = sorted({r for r, _ in self.targets.values()})
        return {"type": self.type, "modules": len(self.targets), "ranks": ranks,
                "dropout": self.dropout, "train_fully": self.train_fully, "lr": self.lr,
                **self.selectors}


def plan_adapter(model: nn.Module, cfg: Any, head_paths: list[str]) -> AdapterPlan | None:
    """`adapter` (the config group) resolved against the model before its adapters go in;
    None when `adapter.type` is null.

    Raises:
        ConfigError: every problem at once — an unknown type, a selector that matches
            nothing, a matched module of a type adapters do not go on, a head path chosen.
    """
    kind = cfg.get("type")
    if kind is None:
        return None
    problems: list[str] = []
    if kind not in ADAPTER_TYPES:
        raise FinetuneError(f"adapter.type={kind!r} is not one of {', '.join(ADAPTER_TYPES)} "
                            "(or null for none)")
    if not as_list(cfg.get("modules")):
        raise FinetuneError("adapter.type is set but adapter.modules is empty; name the layers "
                            "that get adapters, e.g. [blocks.*.attn.qkv, blocks.*.mlp.fc*] or "
                            "layer4.*.conv2")
    layers = _adaptable(model, cfg.get("modules"), "adapter.modules", head_paths, problems)
    rank, alpha = int(cfg.get("rank")), float(cfg.get("alpha"))
    targets = {name: (rank, alpha) for name in layers}
    for i, entry in enumerate(cfg.get("overrides") or []):
        key = f"adapter.overrides[{i}]"
        if not as_list(entry.get("modules")):
            problems.append(f"{key}: needs modules: a selector of adapted layers")
            continue
        chosen = _adaptable(model, entry.get("modules"), f"{key}.modules", head_paths,
                            problems)
        outside = [n for n in chosen if n not in targets]
        if outside:
            problems.append(f"{key}.modules: {outside[0]} gets no adapter (adapter.modules "
                            "does not select it); an override changes the rank or alpha of "
                            "layers adapter.modules selects")
        for name in chosen:
            if name in targets:
                r, a = targets[name]
                targets[name] = (int(entry.get("rank") or r), float(entry.get("alpha") or a))
    fully: list[str] = []
    if as_list(cfg.get("train_fully")):
        try:
            fully = select_modules(model, cfg.get("train_fully"), "adapter.train_fully")
        except FinetuneError as err:
            problems += err.problems
        both = [n for n in fully if any(inside(t, [n]) or inside(n, [t]) for t in targets)]
        if both:
            problems.append(f"adapter.train_fully: {both[0]} holds (or is) a layer that gets "
                            "an adapter; a layer either trains fully or gets an adapter")
    if problems:
        raise ConfigError(problems)
    return AdapterPlan(kind, targets, float(cfg.get("dropout")),
                       [*head_paths, *[n for n in fully if not inside(n, head_paths)]],
                       cfg.get("lr"),
                       {"selector": describe(cfg.get("modules")), "rank": rank,
                        "alpha": alpha})


def _adaptable(model: nn.Module, selector: Any, key: str, head_paths: list[str],
               problems: list[str]) -> list[str]:
    """The layers a selector names that an adapter can go on; each other match is a
    problem (a container selected by a glob is passed over: its layers are listed too)."""
    try:
        chosen = select_modules(model, selector, key)
    except FinetuneError as err:
        problems += err.problems
        return []
    layers, wrong = [], []
    for name in chosen:
        module = model.get_submodule(name)
        if inside(name, head_paths):
            problems.append(f"{key}: {name} is the new head, which trains fully; adapters go "
                            "on pretrained layers")
            return []
        if isinstance(module, ADAPTABLE) and getattr(module, "groups", 1) == 1:
            layers.append(name)
        elif isinstance(module, nn.Conv2d):
            wrong.append(f"{name} (a grouped Conv2d, groups={module.groups})")
        elif not any(True for _ in module.children()):
            wrong.append(f"{name} ({type(module).__name__})")
    if wrong:
        more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        problems.append(f"{key}: {wrong[0]}{more} cannot take an adapter; adapters go on "
                        "Linear and ungrouped Conv2d layers — narrow the selector, e.g. "
                        "blocks.*.attn.qkv or layer4.*.conv2")
    elif not layers and not problems:
        problems.append(f"{key}: {describe(selector)} selects no Linear or Conv2d layer; "
                        "name the layers themselves, e.g. blocks.*.mlp.fc1")
    return layers


def inject(model: nn.Module, plan: AdapterPlan) -> None:
    """Put the adapters in, in place (peft wraps each target layer; its weights stay as
    loaded). B starts at zero, so the adapted model computes what the base did."""
    # lazy: an optional extra (finetune[adapters]) that imports transformers (seconds)
    from peft import LoraConfig, inject_adapter_in_model

    names = list(plan.targets)
    rank, alpha = plan.targets[names[0]]
    # an override's layers by their exact path (peft matches a pattern key as a suffix
    # of the path, so it is anchored with ^)
    ranks = {f"^{re.escape(n)}": r for n, (r, _) in plan.targets.items() if r != rank}
    alphas = {f"^{re.escape(n)}": a for n, (_, a) in plan.targets.items() if a != alpha}
    config = LoraConfig(r=rank, lora_alpha=alpha,
                        lora_dropout=plan.dropout, use_dora=plan.type == "dora",
                        target_modules="^(" + "|".join(map(re.escape, names)) + ")$",
                        rank_pattern=ranks, alpha_pattern=alphas, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def is_adapter_param(name: str) -> bool:
    return bool(ADAPTER_PART.search(name))


def adapter_params(model: nn.Module) -> list[str]:
    """The adapter's own parameters, in model order."""
    return [n for n, _ in model.named_parameters() if is_adapter_param(n)]


def base_sha256(model: nn.Module, plan: AdapterPlan) -> str:
    """A fingerprint of the base weights the adapters apply to: every tensor but the
    adapters' and the modules trained fully, in name order, as peft names them before
    merging (`.base_layer.` dropped) — the same figure for the base before injection."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_tensors(model, plan).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_tensors(model: nn.Module, plan: AdapterPlan) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {name.replace(".base_layer.", "."): t for name, t in state.items()
            if not is_adapter_param(name)
            and not inside(name.rpartition(".")[0], plan.train_fully)}


def adapter_state(model: nn.Module, plan: AdapterPlan) -> dict[str, torch.Tensor]:
    """What adapter.safetensors keeps: the adapter tensors and those of the modules trained
    fully (the head first), under the adapted model's names."""
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
            if is_adapter_param(name) or inside(name.rpartition(".")[0], plan.train_fully)}


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of the model with every adapter merged into the layer it adapts and the peft
    wrapper replaced by that layer: the plain architecture, its state dict under the base
    model's names. The model itself is left as it is."""
    # lazy: an optional extra (finetune[adapters])
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model)
    wrapped = [(name, module) for name, module in plain.named_modules()
               if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, module.get_base_layer())
    return plain


def frozen_base(model: nn.Module, plan: AdapterPlan) -> tuple[set[str], set[str]]:
    """What an adapted model freezes: every module holding parameters but the adapters and
    the modules trained fully (the freeze plan's region), and the model's own parameters
    (a ViT's class token and position embedding: "" in the second set)."""
    holders = [name for name, module in model.named_modules()
               if any(True for _ in module.parameters(recurse=False))]
    region = {name for name in holders if name and not inside(name, plan.train_fully)
              and not ADAPTER_PART.search(f"{name}.")}
    return region, ({""} if "" in holders and not inside("", plan.train_fully) else set())


def adapter_modules(model: nn.Module) -> list[str]:
    """The modules holding adapter parameters (lora_A.default, ...), for its optimizer group."""
    return list(dict.fromkeys(name.rpartition(".")[0] for name in adapter_params(model)))


def config_conflicts(cfg: Any) -> list[str]:
    """What a declared adapter cannot go with, one sentence each (nothing built yet)."""
    if cfg.adapter.get("type") is None:
        return []
    problems = []
    if importlib.util.find_spec("peft") is None:
        problems.append(f"adapter.type={cfg.adapter.type}: adapters come from Hugging Face "
                        "peft, which is not installed; pip install 'finetune[adapters]'")
    if cfg.freeze.train_from is not None or as_list(cfg.freeze.modules):
        problems.append("freeze.train_from / freeze.modules with adapter.type: an adapter's "
                        "base model stays frozen but for the adapters and the head; name "
                        "what else trains fully in adapter.train_fully (freeze.unfreeze "
                        "phases still unfreeze base layers later)")
    if cfg.head.type == "none":
        problems.append("adapter.type with head: none: a feature extractor trains nothing, "
                        "so there is nothing to adapt; give the run a head")
    return problems
