"""Command-line overrides of a parsed sweep file: ``--set KEY=VALUE`` and ``--limit N``.

A key is a dotted path with list indices, e.g. ``run.max_new_tokens`` or ``prompts[0].count``; the value is
read as YAML (``16``, ``0.7``, ``true``, ``[2, 4]``, ``{a: 1}``), so it has the type it would have in the file.
Overrides apply to the raw mapping before validation, so a bad value is refused like one in the file.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from harness.core.errors import ConfigError, ErrorCollector
from harness.core.yaml_file import load_value

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def key_path(key: str) -> list[str | int]:
    """``prompts[0].count`` -> ``["prompts", 0, "count"]``."""
    parts: list[str | int] = []
    position = 0
    for match in _PART.finditer(key):
        between = key[position:match.start()]
        if between not in ("", "."):
            break
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        position = match.end()
    if not parts or position != len(key):
        raise ConfigError("--set", f"cannot read the key {key!r}", "write e.g. run.max_new_tokens=16 or prompts[0].count=2")
    return parts


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``KEY=VALUE`` of ``assignments`` set; every bad assignment is reported at once."""
    raw = copy.deepcopy(raw)
    problems = ErrorCollector()
    for assignment in assignments:
        with problems.check():
            _assign(raw, assignment)
    problems.raise_if_any()
    return raw


def _assign(raw: dict[str, Any], assignment: str) -> None:
    """Set one ``KEY=VALUE`` in ``raw``."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ConfigError("--set", f"{assignment!r} has no '='", "write KEY=VALUE, e.g. run.max_new_tokens=16")
    try:
        value = load_value(text)
    except yaml.YAMLError:
        raise ConfigError("--set", f"cannot read the value of {key!r}: {text!r}", "give a YAML value") from None
    *parents, last = key_path(key.strip())
    node: Any = raw
    for depth, part in enumerate(parents):
        where = _where(parents[:depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError("--set", f"{where} does not exist", "index an existing list entry")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError("--set", f"{where} is not a mapping", "check the key against the sweep file")
            node = node.setdefault(part, {})
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError("--set", f"{_where([*parents, last])} does not exist", "index an existing list entry")
    elif not isinstance(node, dict):
        raise ConfigError("--set", f"{_where(parents)} is not a mapping", "check the key against the sweep file")
    node[last] = value


def limit_prompts(raw: dict[str, Any], limit: int) -> dict[str, Any]:
    """A copy of ``raw`` whose prompt sets keep at most ``limit`` prompts each."""
    if limit < 1:
        raise ConfigError("--limit", f"must be >= 1, got {limit}", "give the number of prompts per set")
    raw = copy.deepcopy(raw)
    for entry in raw.get("prompts") or []:
        if isinstance(entry, dict):
            count = entry.get("count")
            entry["count"] = limit if not isinstance(count, int) or isinstance(count, bool) else min(count, limit)
    return raw


def _where(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
