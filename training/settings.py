"""Training-config dataclasses: the one parser that turns a YAML mapping into one, and the pieces they share.

Every training config (EAGLE head, domain adapters, router, aLoRA, adaptive
drafts) is a frozen dataclass whose defaults say what each field holds. The
parser refuses unknown keys and checks each value against its default's type
(model spec, ``launch``, ``lora``, string, list of strings, number); a field
whose value needs more (a nested mapping, an optional width) gets a
field-specific parser. Range checks stay with each config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from harness.core.errors import ConfigError, ErrorCollector, unknown_key
from harness.core.models import ModelSpec, parse_model_spec
from harness.core.numbers import read_number
from training.launch import LaunchSettings
from training.text import check_sources


class TrainSettings:
    """Mixin of artefact configs: ``identity`` is what the artefact key hashes (how the job runs, ``launch``, is
    left out, also from the training configs nested in this one). ``KEYED_ONLY_WHEN_SET`` names fields that are
    hashed only when set away from their default: settings added after the kind's artefacts were first keyed,
    whose default is what the kind did before, so those artefacts keep their keys."""

    KEYED_ONLY_WHEN_SET: ClassVar[frozenset[str]] = frozenset()

    def check(self, where: str) -> None:
        """Raise ``ConfigError`` for a value out of range (the fields every kind of this class shares)."""

    def identity(self) -> dict[str, Any]:
        """The fields that determine the artefact, as its key hashes them."""
        values = asdict(self)
        values.pop("launch", None)
        defaults = type(self)() if self.KEYED_ONLY_WHEN_SET else None
        for name in self.KEYED_ONLY_WHEN_SET:
            if getattr(self, name) == getattr(defaults, name):
                values.pop(name)
        for name, value in vars(self).items():
            if isinstance(value, TrainSettings):
                values[name] = value.identity()
        return values


@dataclass(frozen=True)
class LoraSettings:
    """peft ``LoraConfig`` settings (SpecuLoRA's defaults)."""

    r: int = 4
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def peft_config(self, **extra: Any):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM", **extra)


def parse_settings(cls: type, raw: Any, where: str, base_dir: Path, zoo_names: tuple[str, ...],
                   fields: dict[str, Callable[[Any, str], Any]] | None = None, ignore: tuple[str, ...] = (),
                   allowed_note: str = "") -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``raw``; ``ConfigError`` naming the field otherwise.

    ``fields`` parses named fields (value, field path) -> value; keys in
    ``ignore`` are accepted and dropped; ``allowed_note`` prefixes the list
    of allowed keys in the unknown-key error (e.g. ``kind``).
    """
    raw = mapping(raw, where)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    problems = ErrorCollector()
    for key in sorted(set(map(str, raw)) - set(defaults) - set(ignore)):
        problems.add(unknown_key(where, key, ([allowed_note] if allowed_note else []) + sorted(defaults)))
    parsers = fields or {}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in ignore or name not in defaults:
            continue
        with problems.check():
            values[name] = _parse_field(cls, name, value, field_path(where, name), defaults[name], parsers, base_dir,
                                        zoo_names)
    problems.raise_if_any()
    settings = cls(**values)
    if isinstance(settings, TrainSettings):
        settings.check(where)
    return settings


def _parse_field(cls: type, name: str, value: Any, path: str, default: Any,
                 parsers: dict[str, Callable[[Any, str], Any]], base_dir: Path, zoo_names: tuple[str, ...]) -> Any:
    """One field of ``parse_settings``: by its named parser, else by the type of its default."""
    if name in parsers:
        return parsers[name](value, path)
    if isinstance(default, ModelSpec):
        return parse_model_spec(value, path, "float32", zoo_names, base_dir)
    if isinstance(default, LaunchSettings):
        return LaunchSettings.from_dict(mapping(value, path), path, base_dir)
    if isinstance(default, LoraSettings):
        return parse_lora(value, path)
    if isinstance(default, str):
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"expected a non-empty string, got {value!r}")
        return value
    if isinstance(default, tuple):
        return string_list(value, path)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        return read_number(value, type(default), path)
    raise TypeError(f"{cls.__name__}.{name}: no parser for a field with default {default!r}")


def check_ranges(config: Any, where: str, minimums: dict[str, int]) -> None:
    """``ConfigError``s naming every field below its minimum, an ``eval_fraction`` outside (0, 1) and a ``lr`` <= 0."""
    problems = ErrorCollector()
    for name, low in minimums.items():
        if getattr(config, name) < low:
            problems.add(ConfigError(f"{where}.{name}", f"must be >= {low}, got {getattr(config, name)}"))
    if hasattr(config, "eval_fraction") and not 0 < config.eval_fraction < 1:
        problems.add(ConfigError(f"{where}.eval_fraction", f"must be between 0 and 1, got {config.eval_fraction}"))
    if config.lr <= 0:
        problems.add(ConfigError(f"{where}.lr", f"must be > 0, got {config.lr}"))
    problems.raise_if_any()


def parse_lora(raw: Any, where: str) -> LoraSettings:
    """``LoraSettings`` from a ``lora`` mapping (unknown keys refused, r >= 1)."""
    settings = parse_settings(LoraSettings, raw, where, Path("."), ())
    if settings.r < 1:
        raise ConfigError(f"{where}.r", f"must be >= 1, got {settings.r}")
    return settings


def parse_domains(raw: Any, where: str, minimum: int = 1) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``domain -> text sources`` pairs from a mapping of at least ``minimum`` domains."""
    if not isinstance(raw, dict) or len(raw) < minimum:
        raise ConfigError(where, f"expected a mapping of at least {minimum} domain(s) -> text sources, got {raw!r}",
                          "e.g. {code: [zoo:code], legal: [zoo:legal]}")
    domains = tuple((str(domain), string_list(sources, f"{where}.{domain}")) for domain, sources in raw.items())
    for domain, sources in domains:
        check_sources(sources, f"{where}.{domain}", answers_allowed=False)
    return domains


def string_list(raw: Any, where: str) -> tuple[str, ...]:
    """A non-empty list of strings (a single string counts as a list of one)."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(item, str) for item in items):
        raise ConfigError(where, f"expected a list of strings, got {raw!r}",
                          "e.g. text sources: zoo:<domain>, hf:<dataset>[:<split>] or a .jsonl/.txt/.parquet path")
    return tuple(items)


def mapping(raw: Any, where: str) -> dict[str, Any]:
    """``raw`` if it is a mapping; ``ConfigError`` otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(where or "config", f"expected a mapping, got {raw!r}")
    return raw


def field_path(where: str, name: str) -> str:
    """The dotted path of field ``name`` under ``where`` (just ``name`` at the top level)."""
    return f"{where}.{name}" if where else name
