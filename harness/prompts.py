"""Prompt sets: built-in held-out zoo prompts, Spec-Bench-format JSONL files, and Hugging Face datasets.

A prompt set is named in the sweep file; ``source`` is one of

- ``zoo:<domain>``: held-out prompts of a zoo domain (code, prose, legal, math);
- a path to a JSONL file in Spec-Bench's format (``question_id``, ``category``, ``turns``);
- ``hf:<dataset>``: a Hugging Face dataset (``split`` and ``field`` name what to read), where a hub is reachable.

Sets are split into ``shards`` by index (prompt i goes to shard i mod shards).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.corpus import DOMAINS, CorpusConfig
from harness.errors import ConfigError

ZOO_PREFIX = "zoo:"
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable id, a category and one or more conversation turns."""

    prompt_id: str
    category: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class PromptSetSpec:
    """A named prompt set from the sweep file."""

    name: str
    source: str
    count: int | None = None
    shards: int = 1
    categories: tuple[str, ...] = ()
    split: str = "train"
    field: str = "text"
    path: str | None = None  # the resolved file of a JSONL source

    @property
    def kind(self) -> str:
        if self.source.startswith(ZOO_PREFIX):
            return "zoo"
        if self.source.startswith(HF_PREFIX):
            return "hf"
        return "jsonl"

    def key(self) -> dict[str, Any]:
        """The content that identifies this set in cell ids (the resolved path is excluded)."""
        values = asdict(self)
        values.pop("path")
        return values


_KEYS = {"name", "source", "count", "shards", "categories", "split", "field"}


def parse_prompt_set(raw: Any, where: str, base_dir: Path) -> PromptSetSpec:
    """A ``PromptSetSpec`` from a sweep mapping; ``ConfigError`` on bad input."""
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {raw!r}", "write e.g. {name: code, source: zoo:code, count: 8}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown key", f"allowed: {', '.join(sorted(_KEYS))}")
    for key in ("name", "source"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}", "missing or not a string", "every prompt set needs a name and a source")
    count, shards = raw.get("count"), raw.get("shards", 1)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"{where}.count", f"expected a positive integer, got {count!r}", "or leave it out for all prompts")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"{where}.shards", f"expected a positive integer, got {shards!r}")
    categories = raw.get("categories", [])
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise ConfigError(f"{where}.categories", f"expected a list of strings, got {categories!r}")
    spec = PromptSetSpec(name=raw["name"], source=raw["source"], count=count, shards=shards,
                         categories=tuple(categories), split=str(raw.get("split", "train")),
                         field=str(raw.get("field", "text")))
    if spec.kind == "zoo":
        domain = spec.source[len(ZOO_PREFIX):]
        if domain not in DOMAINS:
            raise ConfigError(f"{where}.source", f"unknown zoo prompt set {spec.source!r}",
                              f"choose one of {', '.join(ZOO_PREFIX + d for d in DOMAINS)}")
        if spec.count is None:
            spec = PromptSetSpec(**{**asdict(spec), "count": 8})
    elif spec.kind == "jsonl":
        path = Path(spec.source).expanduser()
        if not path.is_absolute() and not path.exists():
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"{where}.source", f"prompt file {spec.source!r} not found",
                              "give an existing Spec-Bench-format .jsonl path, zoo:<domain> or hf:<dataset>")
        spec = PromptSetSpec(**{**asdict(spec), "path": str(path.resolve())})
    return spec


def load_prompts(spec: PromptSetSpec, corpus: CorpusConfig | None = None) -> list[Prompt]:
    """All prompts of ``spec`` (filtered by category, cut to ``count``), in a stable order."""
    if spec.kind == "zoo":
        from harness.corpus import heldout_prompts

        domain = spec.source[len(ZOO_PREFIX):]
        texts = heldout_prompts(domain, spec.count or 8, config=corpus)
        prompts = [Prompt(f"{domain}-{index}", domain, (text,)) for index, text in enumerate(texts)]
    elif spec.kind == "jsonl":
        prompts = _load_spec_bench(spec.path or spec.source)
    else:
        prompts = _load_hf(spec)
    if spec.categories:
        prompts = [prompt for prompt in prompts if prompt.category in spec.categories]
    return prompts[: spec.count] if spec.count else prompts


def shard(prompts: list[Prompt], index: int, shards: int) -> list[Prompt]:
    """Prompt shard ``index`` of ``shards`` (prompts i with i mod shards == index)."""
    return prompts[index::shards]


def _load_spec_bench(path: str) -> list[Prompt]:
    from datasets import load_dataset

    rows = load_dataset("json", data_files=path, split="train")
    missing = {"question_id", "turns"} - set(rows.column_names)
    if missing:
        raise ConfigError("prompts[].source", f"{path} lacks Spec-Bench field(s) {', '.join(sorted(missing))}",
                          "each line needs question_id, category and turns")
    categories = rows["category"] if "category" in rows.column_names else ["default"] * len(rows)
    return [
        Prompt(str(question_id), str(category), tuple(turns))
        for question_id, category, turns in zip(rows["question_id"], categories, rows["turns"])
    ]


def _load_hf(spec: PromptSetSpec) -> list[Prompt]:
    from datasets import load_dataset

    name = spec.source[len(HF_PREFIX):]
    rows = load_dataset(name, split=spec.split)
    if spec.field not in rows.column_names:
        raise ConfigError("prompts[].field", f"dataset {name} has no column {spec.field!r}",
                          f"choose one of {', '.join(rows.column_names)}")
    limit = spec.count or len(rows)
    return [Prompt(f"{name}-{index}", name, (str(rows[index][spec.field]),)) for index in range(min(limit, len(rows)))]
