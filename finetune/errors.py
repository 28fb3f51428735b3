"""The errors a user can fix: shown as one line each, never as a traceback."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any


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


def run_entry_point(main: Callable[[], Any]) -> None:
    """Run a command's main(); a reader that stops early (`| head`) is no error: the rest of
    the output is dropped and the exit status stays 0, without a BrokenPipeError traceback."""
    try:
        main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0) from None


def print_problems(err: FinetuneError) -> None:
    """Each problem as `finetune: error: ...` on stderr, one line each."""
    for line in err.problems:
        print(f"finetune: error: {line}", file=sys.stderr)
