"""The embedded zoo's build settings and where a build lives (the builder is ``training.zoo``).

A build is keyed by a hash of its :class:`ZooConfig` and saved under
``$SPECSWEEP_HOME/zoo/<hash>/<model>``; loading a zoo model needs only this
module, so the model loader does not depend on the training code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.checksums import verify_files
from harness.core.corpus import DOMAINS, CorpusConfig, corpus_digest
from harness.core.errors import ConfigError, ErrorCollector, unknown_keys
from harness.core.paths import content_hash, specsweep_home

ZOO_MANIFEST = "manifest.json"
ZOO_CONTEXT = 1024  # every zoo model's max_position_embeddings


@dataclass(frozen=True)
class ZooModelConfig:
    """Shape of one zoo model; drafts may start from the target's weights.

    ``domains`` limits a draft's distillation text to those corpus domains (empty:
    all of them), e.g. a general draft that never sees legal or math text.
    """

    name: str
    layers: int
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    init_from_target: bool = True
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schedule:
    """An optimisation schedule: AdamW with linear warm-up and cosine decay."""

    steps: int
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 30


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo build; its hash names the build directory."""

    vocab_size: int = 4096
    seq_len: int = 128
    target: ZooModelConfig = ZooModelConfig("target", layers=12)
    drafts: tuple[ZooModelConfig, ...] = (
        ZooModelConfig("draft-2l", layers=2),
        ZooModelConfig("draft-1l", layers=1),
        ZooModelConfig("draft-general", layers=1, domains=("code", "prose")),
    )
    pretrain: Schedule = Schedule(steps=450)
    distill: Schedule = Schedule(steps=200)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    eval_windows: int = 48
    seed: int = 0

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.target.name, *(draft.name for draft in self.drafts))

    def key(self) -> str:
        """Content hash of this config and of the corpus text it reads here (``corpus_digest``): the build's cache
        key. An empty ``domains`` is left out of it."""
        values = dataclasses.asdict(self)
        for model in (values["target"], *values["drafts"]):
            if not model["domains"]:
                del model["domains"]
        values["corpus_digest"] = corpus_digest(self.corpus)
        return content_hash(values)[:16]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ZooConfig":
        """Build a config from a YAML mapping; bad keys or values raise ``ConfigError`` naming the field."""
        def make(kind: type, values: Any, where: str) -> Any:
            if not isinstance(values, dict):
                raise ConfigError(where, f"expected a mapping, got {values!r}")
            fields = {f.name: f for f in dataclasses.fields(kind)}
            problems = ErrorCollector()
            with problems.check():
                unknown_keys(where, values, sorted(fields))
            for name, value in values.items():
                default = fields[name].default if name in fields else None
                if isinstance(default, (int, float, str)) and not isinstance(default, bool):
                    if isinstance(value, bool) or not isinstance(value, (int, float) if isinstance(default, float) else type(default)):
                        problems.add(ConfigError(f"{where}.{name}", f"expected {type(default).__name__}, got {value!r}"))
            problems.raise_if_any()
            return kind(**values)

        def zoo_draft(values: Any, where: str) -> ZooModelConfig:
            values = dict(values) if isinstance(values, dict) else values
            if isinstance(values, dict) and "domains" in values:
                domains = values["domains"]
                if not isinstance(domains, list) or not domains or any(d not in DOMAINS for d in domains):
                    raise ConfigError(f"{where}.domains", f"expected a non-empty list of zoo domains, got {domains!r}",
                                      f"choose from {', '.join(DOMAINS)}")
                values["domains"] = tuple(domains)
            return make(ZooModelConfig, values, where)

        raw = dict(raw)
        nested = {
            "target": lambda v: make(ZooModelConfig, v, "zoo.target"),
            "drafts": lambda v: tuple(zoo_draft(d, f"zoo.drafts[{i}]") for i, d in enumerate(v or [])),
            "pretrain": lambda v: make(Schedule, v, "zoo.pretrain"),
            "distill": lambda v: make(Schedule, v, "zoo.distill"),
            "corpus": lambda v: make(CorpusConfig, v, "zoo.corpus"),
        }
        problems = ErrorCollector()
        for key, convert in nested.items():
            if key in raw:
                with problems.check():
                    raw[key] = convert(raw[key])
        with problems.check():
            config = make(cls, raw, "zoo")
        problems.raise_if_any()
        return config


def zoo_dir(config: ZooConfig) -> Path:
    """Directory of the build for ``config``."""
    return specsweep_home() / "zoo" / config.key()


def model_path(config: ZooConfig, name: str) -> Path:
    """Directory holding zoo model ``name`` (weights, config and tokenizer)."""
    if name not in config.model_names:
        raise KeyError(f"zoo has no model {name!r}; it has {', '.join(config.model_names)}")
    return zoo_dir(config) / name


def needed_models(config: ZooConfig, names: Iterable[str] | None = None) -> tuple[str, ...]:
    """The models a build for ``names`` (all of the zoo's when None) trains, in the zoo's order: the target, the
    drafts distilled from all domains up to the last one named (they draw their batches in turn from one stream,
    so a draft comes out the same only after those before it; a later build adds the rest, replaying the stream
    past the batches of those built) and the named domain-limited drafts (each has seeds of its own)."""
    wanted = set(config.model_names if names is None else names)
    unlimited = [draft.name for draft in config.drafts if not draft.domains]
    last = max((index for index, name in enumerate(unlimited) if name in wanted), default=-1)
    return (config.target.name, *unlimited[:last + 1],
            *(draft.name for draft in config.drafts if draft.domains and draft.name in wanted))


def built_models(config: ZooConfig) -> tuple[str, ...]:
    """The models of ``config``'s build that are complete (its manifest, rewritten when a build ends, lists them)."""
    path = zoo_dir(config) / ZOO_MANIFEST
    return tuple(json.loads(path.read_text())["models"]) if path.exists() else ()


def is_built(config: ZooConfig, names: Iterable[str] | None = None) -> bool:
    """Whether the build for ``config`` holds every model a build for ``names`` (all when None) trains."""
    return set(needed_models(config, names)) <= set(built_models(config))


def verify_zoo(config: ZooConfig, name: str = "") -> None:
    """``CorruptCache`` when a file of the built zoo (of its model ``name`` only, if given) differs from the
    checksums its manifest recorded."""
    manifest = json.loads((zoo_dir(config) / ZOO_MANIFEST).read_text())
    verify_files(zoo_dir(config), manifest, f"zoo {config.key()}" + (f" model {name!r}" if name else ""),
                 "run `specsweep zoo build` (with --sweep SWEEP.yaml for a sweep's own zoo): it rebuilds a corrupt zoo",
                 under=f"{name}/" if name else "")
