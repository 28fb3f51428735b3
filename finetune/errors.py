"""The errors a user can fix: shown as one line each, never as a traceback."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem with the user's input; the message says what, where and what to do."""


class ConfigError(FinetuneError):
    """One or more problems found in the composed config, reported together."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
