"""Prompt sets: built-in held-out zoo prompts, Spec-Bench-format JSONL files, and Hugging Face datasets.

A prompt set is named in the sweep file; ``source`` is one of

- ``zoo:<domain>``: held-out prompts of a zoo domain (code, prose, legal, math);
- ``specbench``: Spec-Bench's 480 questions, shipped with specsweep (Apache-2.0, see
  ``harness/core/data/spec_bench/NOTICE``), filtered with ``categories``;
- a path to a JSONL file in Spec-Bench's format (``question_id``, ``category``, ``turns``);
- ``hf:<dataset>``: a Hugging Face dataset (``split`` and ``field`` name what to read), where a hub is reachable.

``template`` says how a conversation becomes token ids: ``auto`` (the
tokenizer's chat template when it has one, else plain text), ``none`` (plain
text), or a Jinja file (a chat template of your own); ``system_prompt`` adds a
system message under a chat template. Sets are split into ``shards`` by index
(prompt i goes to shard i mod shards).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.core.corpus import DOMAINS, CorpusConfig, heldout_prompts
from harness.core.errors import ConfigError, unknown_key
from harness.core.jsonl import jsonl_lines
from harness.core.paths import content_hash

ZOO_PREFIX = "zoo:"
HF_PREFIX = "hf:"
SPEC_BENCH = "specbench"
SPEC_BENCH_FILE = Path(__file__).parent / "data" / "spec_bench" / "question.jsonl"
SPEC_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
                         "translation", "summarization", "qa", "math_reasoning", "rag")
TEMPLATE_MODES = ("auto", "none")
QA_TEMPLATE = "Question: {question}\nAnswer:"


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
    per_category: int | None = None  # keep the first N prompts of each category (a balanced slice)
    split: str = "train"
    field: str = "text"
    path: str | None = None  # the resolved file of a JSONL source
    template: str = "auto"  # auto | none | the path of a Jinja chat template
    system_prompt: str | None = None
    template_text: str | None = None  # the Jinja file's content, read once on the driver
    content: str | None = None  # a JSONL file's content hash, taken on the driver (part of cell ids)

    @property
    def kind(self) -> str:
        if self.source.startswith(ZOO_PREFIX):
            return "zoo"
        if self.source.startswith(HF_PREFIX):
            return "hf"
        if self.source == SPEC_BENCH:
            return "specbench"
        return "jsonl"

    def key(self) -> dict[str, Any]:
        """The content that identifies this set in cell ids (paths excluded; a template file by its content)."""
        values = asdict(self)
        values.pop("path")
        text = values.pop("template_text")
        if text is not None:
            values["template"] = content_hash(text)[:16]
        for name, default in (("template", "auto"), ("system_prompt", None), ("per_category", None),
                              ("content", None)):
            if values[name] == default:
                values.pop(name)  # ids of sweeps written before these settings existed stay the same
        return values


_KEYS = {"name", "source", "count", "shards", "categories", "per_category", "split", "field", "template", "system_prompt"}


def parse_prompt_set(raw: Any, where: str, base_dir: Path) -> PromptSetSpec:
    """A ``PromptSetSpec`` from a sweep mapping; ``ConfigError`` on bad input."""
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {raw!r}", "write e.g. {name: code, source: zoo:code, count: 8}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise unknown_key(where, unknown[0], sorted(_KEYS))
    for key in ("name", "source"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}", "missing or not a string", "every prompt set needs a name and a source")
    count, shards = raw.get("count"), raw.get("shards", 1)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"{where}.count", f"expected a positive integer, got {count!r}", "or leave it out for all prompts")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"{where}.shards", f"expected a positive integer, got {shards!r}")
    per_category = raw.get("per_category")
    if per_category is not None and (isinstance(per_category, bool) or not isinstance(per_category, int)
                                     or per_category < 1):
        raise ConfigError(f"{where}.per_category", f"expected a positive integer, got {per_category!r}",
                          "or leave it out to keep every prompt of each category")
    categories = raw.get("categories", [])
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise ConfigError(f"{where}.categories", f"expected a list of strings, got {categories!r}")
    template, template_text = _parse_template(raw.get("template", "auto"), f"{where}.template", base_dir)
    system_prompt = raw.get("system_prompt")
    if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
        raise ConfigError(f"{where}.system_prompt", f"expected a non-empty string, got {system_prompt!r}",
                          "or leave it out for the template's own default")
    spec = PromptSetSpec(name=raw["name"], source=raw["source"], count=count, shards=shards,
                         categories=tuple(categories), per_category=per_category,
                         split=str(raw.get("split", "train")),
                         field=str(raw.get("field", "text")), template=template, system_prompt=system_prompt,
                         template_text=template_text)
    if spec.kind == "specbench":
        unknown = [c for c in spec.categories if c not in SPEC_BENCH_CATEGORIES]
        if unknown:
            raise ConfigError(f"{where}.categories", f"Spec-Bench has no category {unknown[0]!r}",
                              f"choose from {', '.join(SPEC_BENCH_CATEGORIES)}")
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
        spec = PromptSetSpec(**{**asdict(spec), "path": str(path.resolve()),
                                "content": content_hash(path.read_bytes().hex())[:16]})
    available = _count_on_driver(spec, f"{where}.source")
    if available is not None and spec.shards > available:
        raise ConfigError(f"{where}.shards", f"{spec.shards} shards of {available} prompt(s) leave "
                          f"{spec.shards - available} shard(s) empty", f"use shards: {max(1, available)} or fewer")
    return spec


def _count_on_driver(spec: PromptSetSpec, where: str) -> int | None:
    """How many prompts ``spec`` selects, read on the driver so that a bad file is caught before anything starts
    (None for zoo and Hugging Face sets, whose prompts are made or fetched on the workers)."""
    if spec.kind == "zoo":
        return spec.count
    if spec.kind not in ("jsonl", "specbench"):
        return None
    prompts = select(_load_spec_bench(spec.path or str(SPEC_BENCH_FILE), where), spec)
    if not prompts:
        what = f"no prompt of categories {', '.join(spec.categories)}" if spec.categories else "no prompts"
        raise ConfigError(where, f"{spec.path or spec.source} has {what}",
                          "give a file with at least one Spec-Bench-format line")
    return len(prompts)


def _parse_template(raw: Any, where: str, base_dir: Path) -> tuple[str, str | None]:
    """``(template, text)``: ``auto``/``none``, or a Jinja file's path and content."""
    if not isinstance(raw, str) or not raw:
        raise ConfigError(where, f"expected auto, none or a Jinja file path, got {raw!r}")
    if raw in TEMPLATE_MODES:
        return raw, None
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ConfigError(where, f"chat template file {raw!r} not found",
                          "give auto (the tokenizer's template), none (plain text) or a .jinja file path")
    return str(path.resolve()), path.read_text()


def load_prompts(spec: PromptSetSpec, corpus: CorpusConfig | None = None) -> list[Prompt]:
    """All prompts of ``spec`` (filtered by category, cut to ``count``), in a stable order."""
    if spec.kind == "zoo":
        domain = spec.source[len(ZOO_PREFIX):]
        texts = heldout_prompts(domain, spec.count or 8, config=corpus)
        prompts = [Prompt(f"{domain}-{index}", domain, (text,)) for index, text in enumerate(texts)]
    elif spec.kind == "specbench":
        prompts = _load_spec_bench(str(SPEC_BENCH_FILE))
    elif spec.kind == "jsonl":
        prompts = _load_spec_bench(spec.path or spec.source)
    else:
        prompts = _load_hf(spec)
    return select(prompts, spec)


def select(prompts: list[Prompt], spec: PromptSetSpec) -> list[Prompt]:
    """The prompts ``spec`` keeps: filtered by category, the first ``per_category`` of each, cut to ``count``."""
    if spec.categories:
        prompts = [prompt for prompt in prompts if prompt.category in spec.categories]
    if spec.per_category:
        seen: dict[str, int] = {}
        kept = []
        for prompt in prompts:
            seen[prompt.category] = seen.get(prompt.category, 0) + 1
            if seen[prompt.category] <= spec.per_category:
                kept.append(prompt)
        prompts = kept
    return prompts[: spec.count] if spec.count else prompts


def conversation_ids(tokenizer, spec: PromptSetSpec, conversation: list[str], limit: int) -> list[int]:
    """Token ids of a conversation so far (user turns and answers alternating), left-truncated to ``limit``.

    Under a chat template the turns become user/assistant messages (after the
    optional system prompt) with the generation prompt appended; otherwise zoo
    prompts are raw text and other sets use a plain ``Question: ... Answer:`` frame.
    """
    template = chat_template(tokenizer, spec)
    if template is not None:
        messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
        messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": text}
                     for i, text in enumerate(conversation)]
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        parts = []
        for index, text in enumerate(conversation):
            if index % 2 == 1:
                parts.append(" " + text.strip() + "\n\n")
            elif spec.kind == "zoo":
                parts.append(text)
            else:
                parts.append(QA_TEMPLATE.format(question=text.strip()))
        ids = tokenizer("".join(parts))["input_ids"]
    ids = list(ids)
    return ids[-limit:] if len(ids) > limit else ids


def chat_template(tokenizer, spec: PromptSetSpec) -> str | None:
    """The Jinja chat template ``spec`` applies with ``tokenizer``, or None for plain text."""
    if spec.template == "none":
        return None
    if spec.template_text is not None:
        return spec.template_text
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else None


def template_label(tokenizer, spec: PromptSetSpec) -> str:
    """How ``spec``'s prompts were templated, for records and reports: ``none``, ``tokenizer:<hash>`` or ``file:<name>``."""
    template = chat_template(tokenizer, spec)
    if template is None:
        return "none"
    origin = f"file:{Path(spec.template).name}" if spec.template_text is not None else "tokenizer"
    system = " +system" if spec.system_prompt else ""
    return f"{origin}:{content_hash(template)[:8]}{system}"


def shard(prompts: list[Prompt], index: int, shards: int) -> list[Prompt]:
    """Prompt shard ``index`` of ``shards`` (prompts i with i mod shards == index)."""
    return prompts[index::shards]


def _load_spec_bench(path: str, where: str = "prompts[].source") -> list[Prompt]:
    """Prompts of a Spec-Bench-format JSONL file; ``ConfigError`` on ``where`` naming the file and line of a bad
    row."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(where, f"{path} is not UTF-8 text (byte {error.start})", "save the file as UTF-8") from None
    prompts = []
    for number, line in jsonl_lines(text):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(where, f"{path} line {number} is not JSON ({error.msg} at column {error.colno})",
                              "each line must be one JSON object") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if turns is None or "question_id" not in row or not isinstance(turns, list) or not turns \
                or not all(isinstance(t, str) for t in turns):
            raise ConfigError(where, f"{path} line {number} lacks question_id or a non-empty list of turns",
                              "each line needs question_id, category and turns (a list of strings)")
        prompts.append(Prompt(str(row["question_id"]), str(row.get("category", "default")), tuple(turns)))
    return prompts


def _load_hf(spec: PromptSetSpec) -> list[Prompt]:
    from datasets import load_dataset

    name = spec.source[len(HF_PREFIX):]
    rows = load_dataset(name, split=spec.split)
    if spec.field not in rows.column_names:
        raise ConfigError("prompts[].field", f"dataset {name} has no column {spec.field!r}",
                          f"choose one of {', '.join(rows.column_names)}")
    limit = spec.count or len(rows)
    return [Prompt(f"{name}-{index}", name, (str(rows[index][spec.field]),)) for index in range(min(limit, len(rows)))]
