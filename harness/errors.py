"""The one error type users see for bad input: a field, what is wrong, and the fix, on one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad user input, reported as ``<field>: <problem>; <fix>`` before any model loads."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        message = f"{field}: {problem}" + (f"; {fix}" if fix else "")
        super().__init__(" ".join(message.split()))


def unknown_key(where: str, key: str, allowed: Iterable[str], what: str = "key") -> ConfigError:
    """The error for an unknown ``key`` at ``where``: the allowed keys, with the closest one as "did you mean"."""
    allowed = list(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}.{key}" if where else str(key), f"unknown {what}", f"{hint}allowed: {', '.join(allowed)}")
