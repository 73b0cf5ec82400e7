"""The one error type users see for bad input: a field, what is wrong, and the fix, on one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input, reported as ``<field>: <problem>; <fix>`` before any model loads."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        message = f"{field}: {problem}" + (f"; {fix}" if fix else "")
        super().__init__(" ".join(message.split()))
