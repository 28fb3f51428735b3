"""Where a recipe source's run lives: keyed by its resolved config, overrides included."""

from __future__ import annotations

import re

import pytest

from finetune.weights.readers import SourceNotTrained, read_recipe, sources_dir


def _planned_dir(overrides: list[str]) -> str:
    with pytest.raises(SourceNotTrained) as untrained:
        read_recipe("digits_source", overrides, train=False)
    found = re.search(r"into (\S+)$", str(untrained.value))
    assert found, untrained.value
    return found.group(1)


def test_the_reuse_key_follows_the_overrides() -> None:
    one, again = _planned_dir(["seed=1"]), _planned_dir(["seed=1"])
    other = _planned_dir(["seed=2"])
    assert one == again and one != other
    assert one.startswith(str(sources_dir() / "digits_source-"))
