"""Find the classifier of any torchvision family and replace it for a new number of classes."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.models.surgery import set_module
from finetune.seeding import derive

# torchvision builds every classifier for 1000 ImageNet classes unless told otherwise; the
# modules producing that many outputs are the classifiers (the main one is the last).
TORCHVISION_CLASSES = 1000


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return module.out_channels
    return None


def find_classifiers(model: nn.Module, num_outputs: int = TORCHVISION_CLASSES) -> list[str]:
    """Paths of the classifier layers, main classifier first, auxiliary ones after.

    A classifier is a Linear (or 1x1 Conv2d, as in squeezenet) giving `num_outputs` values.
    """
    found = [name for name, module in model.named_modules() if _out_features(module) ==
             num_outputs]
    return found[-1:] + found[:-1]


def make_head(in_features: int, num_classes: int, dropout: float = 0.0,
              hidden: list[int] | tuple[int, ...] = (), conv: bool = False) -> nn.Module:
    """A Linear classifier, or an MLP when `hidden` widths are given; 1x1 convs when `conv`."""

    def layer(n_in: int, n_out: int) -> nn.Module:
        return nn.Conv2d(n_in, n_out, kernel_size=1) if conv else nn.Linear(n_in, n_out)

    if not hidden and not dropout:
        return layer(in_features, num_classes)
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [layer(width, h), nn.ReLU(inplace=True)]
        width = h
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(layer(width, num_classes))
    return nn.Sequential(*layers)


def replace_heads(model: nn.Module, num_classes: int, dropout: float = 0.0,
                  hidden: list[int] | tuple[int, ...] = ()) -> list[str]:
    """Replace every classifier for `num_classes`; returns their paths, main first.

    `dropout` and `hidden` shape the main head; auxiliary heads become one plain layer.
    """
    paths = find_classifiers(model)
    if not paths:
        raise FinetuneError(f"no classifier layer with {TORCHVISION_CLASSES} outputs found in "
                            f"{type(model).__name__}; set `head: none` and build the head "
                            "with surgery (op: replace) instead")
    for i, path in enumerate(paths):
        old = model.get_submodule(path)
        conv = isinstance(old, nn.Conv2d)
        in_features = old.in_channels if conv else old.in_features
        head = (make_head(in_features, num_classes, dropout, hidden, conv) if i == 0
                else make_head(in_features, num_classes, conv=conv))
        set_module(model, path, head.to(old.weight.device))
    return paths


def seed_heads(model: nn.Module, head_paths: list[str], seed: int,
               class_names: list[str]) -> None:
    """Draw the new heads' starting weights again, from a stream of their own: the run's seed
    and its class names.

    Built from the global stream, a new head of the same architecture and seed is the same
    draw in every run: a source that finetune trained from scratch on other classes started
    from exactly this head, and after a short training its classifier is still nearly it
    (correlation 0.97 on the quickstart's digits 0-4). Fine-tuned on new classes, the "new"
    head would begin as the old one, confidently mapping each new class to an old one. With
    the class names in the seed, two runs share a head's start only when they share their
    classes (and then the source's head loads anyway).
    """
    names = "\x1f".join(class_names).encode()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, zlib.crc32(names), 5))
        for path in head_paths:
            for module in model.get_submodule(path).modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset) and not list(module.children()):
                    reset()
