"""Numbers read from a user's files: integers where an integer is meant, finite numbers everywhere.

YAML lets a number be ``.nan`` or ``.inf``; no setting of a sweep or a training config means either, so both are
refused where they are read, with the field named. Text that only looks like a number (``"1e9"`` quoted) is refused
with the hint to write it bare.
"""

from __future__ import annotations

import math
from typing import Any

from harness.core.errors import ConfigError


def read_number(raw: Any, kind: type, where: str) -> int | float:
    """``raw`` as ``kind`` (``int`` or ``float``): booleans, fractions where an integer is meant, text and
    non-finite values are each a ``ConfigError`` on ``where``."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (kind is int and not isinstance(raw, int)):
        if isinstance(raw, str) and _looks_numeric(raw):
            raise ConfigError(where, f"expected {wanted}, got the text {raw!r}", f"write it without quotes: {raw}")
        raise ConfigError(where, f"expected {wanted}, got {raw!r}")
    if not math.isfinite(raw):
        raise ConfigError(where, f"expected a finite number, got {raw}", "write a finite value")
    return kind(raw)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
