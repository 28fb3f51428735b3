"""Where a recipe source's run lives: keyed by its resolved config, overrides included."""

from __future__ import annotations

import re

import pytest

from finetune.weights import readers
from finetune.weights.readers import SourceNotTrained, read_recipe, sources_dir
from tests.conftest import REPO


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


def test_the_key_is_composed_again_when_a_recipe_file_changes(tmp_path) -> None:
    """A sweep's jobs compose the same source once per process; a recipe file edited between
    them (the source's own, or one it could read) is composed again, never a stale key."""
    shipped = (REPO / "recipes" / "digits_source.yaml").read_text()
    recipe = tmp_path / "source.yaml"
    recipe.write_text(shipped)
    readers._COMPOSED.clear()

    def planned() -> str:
        with pytest.raises(SourceNotTrained) as untrained:
            read_recipe(str(recipe), [], train=False)
        return re.search(r"into (\S+)$", str(untrained.value)).group(1)

    first, again = planned(), planned()
    assert first == again and len(readers._COMPOSED) == 1
    recipe.write_text(shipped.replace("max_epochs: 4", "max_epochs: 5"))
    assert planned() != first  # the edited recipe's own key
    (tmp_path / "neighbour.yaml").write_text("# a recipe beside it\n")
    assert planned() != first and len(readers._COMPOSED) == 3  # composed again, same key
