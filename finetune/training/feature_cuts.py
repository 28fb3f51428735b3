"""Where a model can be cut for the feature cache: the frozen prefix traced with torch.fx (whole
modules kept, random or stateful layers refused), its bottlenecks, the segments between two
cuts, and the identity of a prefix (its graph and its tensors' digests)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

_RANDOM_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout, F.rrelu}


class _WholeModules(fx.Tracer):
    """Every module but Sequential is one call: its forward runs as written at run time."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return not isinstance(module, nn.Sequential)


@dataclass
class Cut:
    """The model cut in two: `prefix(x)` -> features, `suffix(features)` -> the output."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    boundary: str  # where the cut is, e.g. "the output of flatten"
    stopped: str | None = None  # why the cut is before the end of the frozen part, if it is

    def frozen_share(self, model: nn.Module) -> float:
        """The share of the model's frozen parameters that the prefix computes with."""
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        inside = sum(p.numel() for p in self.prefix.parameters())
        return inside / frozen if frozen else 0.0


def _trace(model: nn.Module) -> fx.Graph:
    return _WholeModules().trace(model)


def _training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _trace_both_modes(model: nn.Module) -> tuple[fx.Graph, str | None]:
    """The graph in the model's current (training) modes, and whether eval mode traces the
    same code (None) or not (a reason)."""
    flags = _training_flags(model)
    graph = _trace(model)
    try:
        model.eval()
        same = _trace(model).python_code("self").src == graph.python_code("self").src
    finally:
        for name, m in model.named_modules():
            m.training = flags[name]
    return graph, None if same else ("the model's forward differs between training and "
                                     "evaluation (e.g. auxiliary outputs)")


def _random_or_stateful(module: nn.Module, path: str) -> str | None:
    """Why this frozen module's output is not a function of its input alone, if it is not."""
    for name, sub in module.named_modules():
        where = f"{path}.{name}" if name else path
        if not sub.training:
            continue
        if isinstance(sub, _DropoutNd | nn.RReLU) or type(sub).__name__ == "StochasticDepth":
            return f"{where} ({type(sub).__name__}) is random in training"
        if isinstance(sub, _BatchNorm):
            return (f"{where} is a BatchNorm in training mode (freeze.bn=train): it normalizes "
                    "with batch statistics and updates its own")
        if isinstance(sub, _InstanceNorm) and sub.track_running_stats:
            return f"{where} updates running statistics in training"
    return None


def cut_model(model: nn.Module) -> Cut | str:
    """The cut after the frozen prefix, or why there is none."""
    try:
        graph, differs = _trace_both_modes(model)
    except Exception as err:
        return (f"the forward cannot be traced by torch.fx ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:160]})")
    if differs:
        return differs
    trainable = {name for name, m in model.named_modules()
                 if any(p.requires_grad for p in m.parameters())}
    params = dict(model.named_parameters())
    prefix: set[fx.Node] = set()
    stopped: str | None = None  # the first frozen operation left out of the prefix, and why
    for node in graph.nodes:
        if node.op == "output":
            continue
        inputs_frozen = all(n in prefix for n in node.all_input_nodes)
        if node.op == "placeholder":
            prefix.add(node)
        elif node.op == "call_module":
            if node.target not in trainable and inputs_frozen:
                reason = _random_or_stateful(model.get_submodule(str(node.target)),
                                             str(node.target))
                if reason:  # computed every step, as without the cache: the cut comes before
                    stopped = stopped or reason
                else:
                    prefix.add(node)
        elif node.op == "get_attr":
            param = params.get(str(node.target))
            if param is None or not param.requires_grad:
                prefix.add(node)
        elif inputs_frozen:
            if node.target in _RANDOM_FUNCTIONS:
                stopped = stopped or f"{node.name} ({node.target.__name__}) is random"
            else:
                prefix.add(node)
    boundary = [n for n in prefix if any(user not in prefix for user in n.users)]
    if any(n.op == "placeholder" for n in boundary):
        return ("the first layer trains" if stopped is None else
                f"the first frozen layer must run every step ({stopped})") + \
            ": there is no frozen prefix to compute once"
    if len(boundary) != 1:
        return (f"the frozen part hands {len(boundary)} values to the trained part "
                f"({', '.join(n.name for n in boundary[:4])}); a cache needs exactly one")
    (cut,) = boundary
    prefix_graph, env = fx.Graph(), {}
    for node in graph.nodes:
        if node in prefix:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(env[cut])
    suffix_graph = fx.Graph()
    env = {cut: suffix_graph.placeholder("features")}
    for node in graph.nodes:
        if node not in prefix:
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    prefix_module, suffix_module = fx.GraphModule(model, prefix_graph, "Prefix"), \
        fx.GraphModule(model, suffix_graph, "Suffix")
    prefix_module.graph.eliminate_dead_code()
    prefix_module.recompile()
    where = str(cut.target) if cut.op == "call_module" else cut.name
    return Cut(prefix_module, suffix_module, f"the output of {where}", stopped)


def tensor_digests(module: nn.Module) -> dict[str, str]:
    """The sha256 of every tensor of a module's state, by name."""
    return {name: hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1)
                                 .view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, tensor in module.state_dict().items()}


def prefix_identity(prefix: fx.GraphModule, digests: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """The prefix's code, modules and every tensor it holds (`digests`: the tensors'
    sha256 by name, computed once for the prefixes cut from one model)."""
    digests = tensor_digests(prefix) if digests is None else digests
    digest = hashlib.sha256()
    for name in sorted(prefix.state_dict()):
        digest.update(name.encode())
        digest.update(digests[name].encode())
    return {"code": prefix.code, "modules": repr(prefix), "tensors": digest.hexdigest()}


def bottlenecks(prefix: fx.GraphModule) -> list[str]:
    """The prefix's nodes (by name, in order, ending with its output) whose value alone
    carries everything the rest of the prefix needs: where it can be cut again."""
    nodes = [n for n in prefix.graph.nodes if n.op not in ("output", "get_attr")]
    found = []
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            continue
        before = set(nodes[:i])
        if not any(n in before for later in nodes[i + 1:] for n in later.all_input_nodes):
            found.append(node.name)
    return found


def segment(prefix: fx.GraphModule, start: str | None, end: str) -> fx.GraphModule:
    """The part of the prefix from node `start`'s value (None: the input) to node `end`'s."""
    graph, env, started, last = fx.Graph(), {}, start is None, None
    for node in prefix.graph.nodes:
        if node.op == "output":
            break
        if not started:
            if node.op == "get_attr":
                env[node] = graph.node_copy(node, lambda n: env[n])
            elif node.name == start:
                env[node], started = graph.placeholder("features"), True
            continue
        env[node] = last = graph.node_copy(node, lambda n: env[n])
        if node.name == end:
            break
    graph.output(last)
    module = fx.GraphModule(prefix, graph, "Prefix")
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def split_bottleneck(prefix: fx.GraphModule, points: list[str], split: str) -> str | None:
    """The cut a job with `freeze.train_from=split` would have, if it is inside this prefix:
    the last bottleneck before the first node of `split`'s modules."""
    names = [n.name for n in prefix.graph.nodes]
    first = next((i for i, n in enumerate(prefix.graph.nodes) if n.op == "call_module" and (
        str(n.target) == split or str(n.target).startswith(f"{split}."))), None)
    if first is None:
        return None
    before = [p for p in points if names.index(p) < first]
    return before[-1] if before else None
