"""A shared recipe cannot run code: `_target_` and import-by-string outside the allowlist are
refused before anything is imported (aliases included); your own layers need an explicit
command-line flag; weight files and checkpoints never unpickle code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

from finetune.compose.allowlist import ALLOW_ENV, take_allow_flags
from finetune.compose.prepare import prepare
from finetune.errors import ConfigError, FinetuneError
from finetune.models.surgery import apply_surgery

ALIASES = ["logging.os.system", "builtins.exec", "subprocess.call", "os.system",
           "torch.nn.modules.module.os.system"]


def _recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "shared.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("target", ALIASES)
def test_target_anywhere_in_a_recipe_is_refused_before_anything_runs(
        tmp_path: Path, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, f"model:\n  kwargs:\n    _target_: {target}\n    _args_: "
                               f"[touch {tmp_path / 'pwned'}]\n")
    with pytest.raises(ConfigError) as refused:
        prepare([f"recipe={recipe}"])
    assert refused.value.problems == [
        f"{recipe}: model.kwargs._target_={target!r}: _target_ is not read from recipes (they "
        "name components from the registry, e.g. {type: Linear}); for your own layers write "
        "type: and run with --allow-module"]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("target", ALIASES[:4])
def test_a_layer_named_by_an_import_path_is_refused(tmp_path: Path, target: str) -> None:
    recipe = _recipe(tmp_path, "surgery:\n  - op: insert_after\n    path: avgpool\n"
                               f"    module: {{type: {target}}}\n")
    with pytest.raises(ConfigError) as refused:
        prepare([f"recipe={recipe}"])
    assert refused.value.problems == [
        f"{recipe}: surgery[0].module.type: {target!r} would import code by name, which a "
        "recipe may not do; layers are torch.nn and torchvision.ops classes. To use your own "
        f"module, run with --allow-module {target.split('.')[0]} on the command line"]
    # the same from the command line's overrides
    with pytest.raises(ConfigError, match="would import code by name"):
        prepare(["recipe=base", "surgery=[{op: remove, path: fc, module: {type: "
                 + target + "}}]"])
    with pytest.raises(ConfigError, match="_target_ is not read from recipes"):
        prepare(["recipe=base", f"+model.kwargs._target_={target}"])


def test_torch_nn_and_torchvision_ops_by_full_name_are_looked_up_not_imported() -> None:
    result = apply_surgery(torchvision.models.resnet18(), [
        {"op": "insert_after", "path": "layer4",
         "module": {"type": "torchvision.ops.SqueezeExcitation", "input_channels": 512,
                    "squeeze_channels": 32}},
        {"op": "replace", "path": "fc", "with": {"type": "torch.nn.Linear", "out_features": 3}}],
        32)
    assert result.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(FinetuneError, match=r"torch\.nn has no layer 'system'"):
        apply_surgery(torchvision.models.resnet18(), [
            {"op": "replace", "path": "fc", "with": {"type": "torch.nn.system"}}], 32)


@pytest.fixture
def own_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "mylayers"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import os\nfrom torch import nn\nfrom torch.nn import Linear\n\n"
        "class Gate(nn.Module):\n    def __init__(self, scale=2.0):\n        super().__init__()\n"
        "        self.scale = scale\n\n    def forward(self, x):\n        return x * self.scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    yield "mylayers"
    sys.modules.pop("mylayers", None)


def test_your_own_layers_need_the_command_line_flag(own_module: str, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "surgery:\n  - op: insert_after\n    path: avgpool\n"
                               "    module: {type: mylayers.Gate, scale: 3.0}\n")
    with pytest.raises(ConfigError, match="run with --allow-module mylayers on the command"):
        prepare([f"recipe={recipe}"])
    assert "mylayers" not in sys.modules  # nothing was imported to find that out
    args = take_allow_flags(["--allow-module", "mylayers", f"recipe={recipe}"])
    assert args == [f"recipe={recipe}"]
    prepare(args)  # allowed now
    op = {"op": "insert_after", "path": "avgpool", "module": {"type": "mylayers.Gate",
                                                              "scale": 3.0}}
    model = apply_surgery(torchvision.models.resnet18(), [op], 32).model
    assert type(model.avgpool[1]).__name__ == "Gate" and model.avgpool[1].scale == 3.0
    # Reachable through the allowed prefix, defined elsewhere: refused.
    for alias, message in (("mylayers.os.system", "cannot import 'mylayers.os.system'"),
                           ("mylayers.Linear", "is not an nn.Module class defined under "
                                               "mylayers")):
        alias_op = {**op, "module": {"type": alias}}
        with pytest.raises(FinetuneError, match=message):
            apply_surgery(torchvision.models.resnet18(), [alias_op], 32)
    with pytest.raises(FinetuneError, match="--allow-module needs a module prefix"):
        take_allow_flags(["--allow-module"])


def test_an_allowed_prefix_is_a_module_not_the_start_of_a_name(
        own_module: str, tmp_path: Path) -> None:
    """`--allow-module mylayers` allows mylayers and mylayers.sub, never mylayersevil: refused
    at compose time and again where the layer is built, and nothing is imported."""
    (tmp_path / "mylayersevil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(tmp_path / 'imported')!r}).touch()\n"
        "from torch import nn\nclass Thing(nn.Module):\n    pass\n")
    recipe = _recipe(tmp_path, "surgery:\n  - op: insert_after\n    path: avgpool\n"
                               "    module: {type: mylayersevil.Thing}\n")
    args = take_allow_flags(["--allow-module", "mylayers", f"recipe={recipe}"])
    with pytest.raises(ConfigError, match=r"'mylayersevil\.Thing' would import code by name"):
        prepare(args)
    op = {"op": "insert_after", "path": "avgpool", "module": {"type": "mylayersevil.Thing"}}
    with pytest.raises(FinetuneError, match="would import code by name"):
        apply_surgery(torchvision.models.resnet18(), [op], 32)
    assert "mylayersevil" not in sys.modules and not (tmp_path / "imported").exists()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """resume= reads checkpoints weights-only: a crafted pickle cannot run (the marker must
    not exist afterwards)."""
    from finetune.training.resume import check_resumable

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "finetune": Evil(), "epoch": 1}, path)
    with pytest.raises(FinetuneError, match="cannot read the checkpoint"):
        check_resumable(path, None)  # type: ignore[arg-type]
    assert not marker.exists()


def test_a_received_run_dir_is_checked_like_a_recipe(tmp_path: Path) -> None:
    run = tmp_path / "received"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "model:\n  name: resnet18\n  kwargs:\n    _target_: subprocess.call\n")
    with pytest.raises(ConfigError, match=r"model\.kwargs\._target_='subprocess\.call': "
                                          "_target_ is not read from recipes"):
        prepare([f"rerun={run}"])
