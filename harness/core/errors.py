"""The one error type users see for bad input: a field, what is wrong, and the fix, on one line.

A parser that checks independent parts of a file (a sweep's sections, a
params mapping's fields) gathers their errors in an ``ErrorCollector`` and
raises them together as ``ConfigErrors``, so a user sees every problem of the
file at once, one line each.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class ConfigError(ValueError):
    """Bad user input, reported as ``<field>: <problem>; <fix>`` before any model loads."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        message = f"{field}: {problem}" + (f"; {fix}" if fix else "")
        super().__init__(" ".join(message.split()))


class ConfigErrors(ConfigError):
    """Several bad inputs of one file: ``errors``, one line each (the first one's field is ``field``)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = list(errors)
        self.field = self.errors[0].field
        ValueError.__init__(self, "\n".join(str(error) for error in self.errors))


class ErrorCollector:
    """Gathers the ``ConfigError``s of independent checks; ``raise_if_any`` raises them as one error."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run the enclosed check, keeping its ``ConfigError`` (or each of its ``ConfigErrors``) instead of raising."""
        try:
            yield
        except ConfigErrors as errors:
            for error in errors.errors:
                self.add(error)
        except ConfigError as error:
            self.add(error)

    def add(self, error: ConfigError) -> None:
        """Keep ``error`` unless the same line is already kept (a grid repeats its params' errors per point)."""
        if all(str(error) != str(kept) for kept in self.errors):
            self.errors.append(error)

    def raise_if_any(self) -> None:
        """Raise the one error kept as itself, several as ``ConfigErrors``; nothing if there are none."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


class InfraError(RuntimeError):
    """The environment failed, not the input: an unreachable cluster, an unwritable results directory, workers
    that cannot start, a run directory another driver holds. One line: what failed and what to do."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(" ".join((problem + (f"; {fix}" if fix else "")).split()))


def unknown_keys(where: str, keys: Iterable[str], allowed: Iterable[str], what: str = "key") -> None:
    """Raise ``unknown_key``'s error for every key of ``keys`` not in ``allowed``, together."""
    allowed = list(allowed)
    collector = ErrorCollector()
    for key in sorted(set(map(str, keys)) - set(allowed)):
        collector.add(unknown_key(where, key, allowed, what))
    collector.raise_if_any()


def unknown_key(where: str, key: str, allowed: Iterable[str], what: str = "key") -> ConfigError:
    """The error for an unknown ``key`` at ``where``: the allowed keys, with the closest one as "did you mean"."""
    allowed = list(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}.{key}" if where else str(key), f"unknown {what}", f"{hint}allowed: {', '.join(allowed)}")
