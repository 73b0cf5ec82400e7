"""JSON Lines text split as the format defines it: on ``\\n`` only.

``str.splitlines`` also splits on U+2028, U+2029, form feeds and other separators that JSON allows raw inside a
string, so a valid line holding one would be cut in two.
"""

from __future__ import annotations

from collections.abc import Iterator


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line of ``text``, a trailing ``\\r`` removed."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line
