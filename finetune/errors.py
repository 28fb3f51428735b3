"""The errors a user can fix: shown as one line each, never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FinetuneError(Exception):
    """A problem with the user's input; the message says what, where and what to do."""

    @property
    def problems(self) -> list[str]:
        """One line per problem (ConfigError carries several)."""
        return [str(self)]


class ConfigError(FinetuneError):
    """One or more problems found in the composed config, reported together."""

    def __init__(self, problems: list[str]) -> None:
        self._problems = list(problems)
        super().__init__("\n".join(self._problems))

    @property
    def problems(self) -> list[str]:
        return self._problems


def did_you_mean(word: object, options: Iterable[object], n: int = 3, cutoff: float = 0.5) -> str:
    """' (did you mean 'a' or 'b'?)' for the options closest to `word`, or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
