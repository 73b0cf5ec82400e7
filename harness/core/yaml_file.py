"""Reading a user's YAML file strictly: a missing file, bytes that are not UTF-8, a syntax error and a key given
twice in one mapping (where YAML would let the last one win silently) are each one ``ConfigError`` line.

Numbers follow YAML 1.2: ``1e9`` and ``3E-4`` are numbers, where PyYAML's YAML 1.1 rules read an exponent without
a dot as text."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from harness.core.errors import ConfigError


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"key {key!r} at line {line} repeats line {first_line}")
        self.key, self.first_line, self.line = key, first_line, line


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first is not None:
                raise _DuplicateKey(key, first + 1, key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def load_value(text: str) -> Any:
    """``text`` parsed as one YAML value by the same rules as a file (``yaml.YAMLError`` when it is not YAML)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path, field: str, what: str = "YAML file") -> Any:
    """The parsed content of the YAML file at ``path``; ``ConfigError`` on ``field`` when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        hint = "it is a directory: pass a file" if path.is_dir() else f"pass the path of a {what}"
        raise ConfigError(field, f"{path} not found", hint)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(field, f"{path} is not UTF-8 text (byte {error.start})", "save the file as UTF-8") from None
    except OSError as error:
        raise ConfigError(field, f"{path} cannot be read ({error.strerror})", "check its permissions") from None
    return parse_yaml(text, field, str(path))


def parse_yaml(text: str, field: str, name: str) -> Any:
    """``text`` parsed strictly (see the module docstring); ``ConfigError`` on ``field`` naming ``name``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as error:
        raise ConfigError(field, f"{name}: key {error.key!r} appears twice (lines {error.first_line} and "
                                 f"{error.line})", "keep one of them: YAML would silently use the last") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(field, f"{name} is not valid YAML{where}", "fix the YAML syntax") from None
