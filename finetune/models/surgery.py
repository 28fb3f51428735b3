"""Pure operations on an nn.Module tree addressed by dotted path.

`apply_surgery(model, ops, input_size)` runs the ops of a recipe's `surgery:` list in order
and returns the new model plus a key map: where pretrained tensors of moved modules now live.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finetune import registry
from finetune.errors import ConfigError, FinetuneError, did_you_mean

OPS = ("replace", "insert_after", "insert_before", "remove", "truncate", "rename")


def module_paths(model: nn.Module) -> list[str]:
    """Every submodule's dotted path, in registration order (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, path: str, key: str = "path") -> nn.Module:
    """The submodule at `path`; an unknown path fails naming the closest ones.

    Args:
        key: the config key the path came from, for the error message.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children())
        raise FinetuneError(f"{key}={path!r} matches no module of the model"
                            f"{did_you_mean(path, module_paths(model))}; its top-level modules "
                            "are: "
                            f"{children}") from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path`, replacing what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def io_shapes(model: nn.Module, input_size: int, paths: list[str] | None = None,
              channels: int = 3) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of each module in a dry forward of a (2, C, S, S) batch.

    Raises:
        RuntimeError: when the model cannot run on such a batch.
    """
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple, output: Any) -> None:
            if name not in shapes and args and isinstance(args[0], torch.Tensor) and isinstance(
                    output, torch.Tensor):
                shapes[name] = (tuple(args[0].shape), tuple(output.shape))
        return record

    for name, module in model.named_modules():
        if paths is None or name in paths:
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            output = model(torch.zeros(2, channels, input_size, input_size))
        output = output[0] if isinstance(output, tuple) else output
        shapes.setdefault("", ((2, channels, input_size, input_size), tuple(output.shape)))
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return shapes


# -- building layers named in a recipe ---------------------------------------------------

LAYERS = registry.LAYERS
# The argument a layer's input size goes into, for `auto`.
_INPUT_ARG = {"in_features": -1, "in_channels": 1, "num_features": 1, "normalized_shape": -1,
              "embed_dim": -1}


def build_layer(spec: Any, input_shape: Callable[[], tuple[int, ...] | None], where: str
                ) -> nn.Module:
    """`{type: Linear, out_features: 9, in_features: auto}` -> nn.Linear(in, 9).

    A missing or `auto` input-size argument is taken from `input_shape()` (what flows into
    the layer's place in a dry forward), which is only run when such an argument exists.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise FinetuneError(f"{where}: a layer is written {{type: Name, arg: value, ...}}, "
                            f"got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("type")
    cls = registry.resolve_layer(name, where)
    params = cls.__init__.__code__.co_varnames[:cls.__init__.__code__.co_argcount]
    for arg, dim in _INPUT_ARG.items():
        if arg in params and kwargs.get(arg, "auto") == "auto":
            shape = input_shape()
            if shape is None:
                raise FinetuneError(f"{where}: cannot infer {name}.{arg}; give it a number")
            kwargs[arg] = shape[dim]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise FinetuneError(f"{where}: {name}({kwargs}) rejected: {err}") from None


# -- the ops -------------------------------------------------------------------------------

@dataclass
class SurgeryResult:
    """The model after surgery and where the tensors of moved modules went."""

    model: nn.Module
    key_map: list[tuple[str, str]] = field(default_factory=list)  # (old prefix, new prefix)

    def map_key(self, key: str) -> str:
        """A checkpoint key of the unmodified model -> its name after surgery."""
        for old, new in self.key_map:
            if key == old or key.startswith(f"{old}."):
                key = new + key[len(old):]
        return key


def _parse_slice(text: str, where: str) -> slice:
    try:
        parts = [int(p) if p.strip() else None for p in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise FinetuneError(f"{where}: keep={text!r} is not a slice; write it like ':-1' or "
                            "'0:30'")
    return slice(*parts)


def _shapes_at(model: nn.Module, path: str, size: tuple[int, int], where: str
               ) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(input, output) shape at `path` in a dry forward; None where nothing flowed."""
    shapes = dry_shapes(model, size, where, [path])
    return shapes.get(path, (None, None))


def dry_shapes(model: nn.Module, size: tuple[int, int], where: str,
                paths: list[str] | None = None
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """io_shapes for `size` = (side, channels), a failure named after the op."""
    try:
        return io_shapes(model, size[0], paths, channels=size[1])
    except (RuntimeError, AssertionError) as err:  # torchvision's ViT asserts its size
        raise FinetuneError(f"{where}: the model no longer runs on {size[0]} px, {size[1]}-"
                            f"channel inputs: {str(err).splitlines()[0]}") from None


def apply_op(result: SurgeryResult, op: dict[str, Any], size: tuple[int, int], index: int
             ) -> None:
    """Apply op number `index` on `result` (its model may be replaced by a truncation)."""
    where = f"surgery[{index}] ({op.get('op')} {op.get('path', '')!s})"
    kind = op.get("op")
    if kind not in OPS:
        raise FinetuneError(f"{where}: op={kind!r} is not a surgery op"
                            f"{did_you_mean(kind, OPS, n=2)}; ops are {', '.join(OPS)}")
    path = str(op.get("path", ""))
    model = result.model
    if not (kind == "truncate" and path == ""):
        get_module(model, path, key=f"surgery[{index}].path")
    if kind == "replace":
        layer = build_layer(op.get("with"), lambda: _shapes_at(model, path, size, where)[0],
                            where)
        set_module(model, path, layer)
    elif kind in ("insert_after", "insert_before"):
        original = model.get_submodule(path)
        side = 1 if kind == "insert_after" else 0  # the layer sees the output, or the input

        def shape() -> tuple[int, ...] | None:
            return _shapes_at(model, path, size, where)[side]

        layer = build_layer(op.get("module"), shape, where)
        pair = [("0", original), ("1", layer)] if side else [("0", layer), ("1", original)]
        set_module(model, path, nn.Sequential(OrderedDict(pair)))
        kept = "0" if kind == "insert_after" else "1"
        result.key_map.append((path, f"{path}.{kept}"))
    elif kind == "remove":
        set_module(model, path, nn.Identity())
    elif kind == "truncate":
        target = model if path == "" else model.get_submodule(path)
        children = list(target.named_children())
        kept = children[_parse_slice(op.get("keep", ""), where)]
        if not kept:
            raise FinetuneError(f"{where}: keep={op.get('keep')!r} keeps nothing of "
                                f"{path or 'the model'} ({len(children)} children)")
        chopped = nn.Sequential(OrderedDict(kept))
        if path == "":
            result.model = chopped
        else:
            set_module(model, path, chopped)
    else:  # rename
        new_name = str(op.get("to", ""))
        if not new_name.isidentifier():
            raise FinetuneError(f"{where}: to={new_name!r} must be a plain attribute name")
        parent_path, _, old_name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if new_name != old_name and hasattr(parent, new_name):
            kind = ("a module" if new_name in parent._modules else
                    "a parameter or buffer" if new_name in {*parent._parameters,
                                                            *parent._buffers}
                    else f"an attribute of {type(parent).__name__}")
            raise FinetuneError(f"{where}: to={new_name!r} is already {kind} of "
                                f"{parent_path or 'the model'}; choose a name it does not "
                                "have")
        module = parent.get_submodule(old_name)
        delattr(parent, old_name)
        setattr(parent, new_name, module)
        # The parent's forward still calls self.<old name>: keep it as a plain alias that is
        # not registered, so parameters and state-dict keys exist once, under the new name.
        object.__setattr__(parent, old_name, module)
        prefix = f"{parent_path}." if parent_path else ""
        result.key_map.append((path, f"{prefix}{new_name}"))


def apply_surgery(model: nn.Module, ops: list[Any], input_size: int, channels: int = 3,
                  problems: list[str] | None = None) -> SurgeryResult:
    """Run `ops` in order; after each, a dry forward checks that every shape still fits.

    Every op is checked: a path that matches nothing changed nothing, so the ops after it
    are still checked; after any other failure the model's shape is unknown and checking
    stops (a failed `replace` leaves the shapes as they were). With `problems` the problems
    are appended to it (the result is then unusable if any were); without, they are raised.

    Raises:
        ConfigError: naming each op (surgery[i]) and its path, the bad value or the shapes.
    """
    found: list[str] = [] if problems is None else problems
    start = len(found)
    result = SurgeryResult(model)
    size = (input_size, channels)

    def attempt(check: Callable[[], Any]) -> None:
        try:
            check()
        except FinetuneError as err:
            found.extend(err.problems)

    for index, op in enumerate(ops):
        before = len(found)
        if not isinstance(op, dict):
            found.append(f"surgery[{index}]: an op is a mapping like {{op: remove, path: "
                         f"avgpool}}, got {op!r}")
            continue
        path = str(op.get("path", ""))
        if not (op.get("op") == "truncate" and path == ""):
            attempt(lambda p=path, i=index: get_module(result.model, p, key=f"surgery[{i}].path"))
        if len(found) > before:
            continue  # a path that matches nothing changed nothing: later ops still check
        attempt(lambda o=op, i=index: apply_op(result, o, size, i))
        if len(found) == before:
            attempt(lambda o=op, i=index: dry_shapes(
                result.model, size, f"surgery[{i}] ({o.get('op')} {o.get('path')})"))
        if len(found) > before and op.get("op") != "replace":
            break  # the model's shape after this op is unknown; later paths depend on it
    if problems is None and len(found) > start:
        raise ConfigError(found)
    return result
