"""Training text: documents from the zoo's domains, a Hugging Face dataset, a local file, or the target's own
answers to one of those or to queries it wrote itself (``answers:<source>``, ``answers:magpie[:tasks]``; see
``training.answers``), cut into token windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.core.corpus import DOMAINS, build_corpus
from harness.core.errors import ConfigError
from training.answers import ANSWERS_PREFIX, AnswerSettings, cached_answers, cached_self_chat, is_answers_source
from training.magpie import MAGPIE_SOURCE, MAGPIE_VARIANTS, variant_settings

ANSWERS_FIX = "answers:<source> needs the target model; only kind: draft and kind: eagle configs take it"


def check_sources(sources: tuple[str, ...], where: str, answers_allowed: bool) -> None:
    """Refuse malformed text sources (and ``answers:`` where no target answers) before anything loads."""
    for source in sources:
        inner = source[len(ANSWERS_PREFIX):] if is_answers_source(source) else source
        if is_answers_source(source) and not answers_allowed:
            raise ConfigError(where, f"{source!r} cannot be used here", ANSWERS_FIX)
        if not inner or is_answers_source(inner):
            raise ConfigError(where, f"{source!r} names no text source",
                              "use answers:zoo:<domain>, answers:hf:<dataset>, answers:magpie[:tasks] or answers:<file>")
        name, _, variant = inner.partition(":")
        if name == MAGPIE_SOURCE and not is_answers_source(source):
            raise ConfigError(where, f"{source!r} is only a source of queries",
                              f"write {ANSWERS_PREFIX}{source}: the target writes the queries and answers them")
        if name == MAGPIE_SOURCE and variant not in MAGPIE_VARIANTS:
            raise ConfigError(where, f"{source!r} names no magpie variant",
                              f"use {ANSWERS_PREFIX}{MAGPIE_SOURCE} or {ANSWERS_PREFIX}{MAGPIE_SOURCE}:tasks")


def source_texts(source: str, field: str, zoo_corpus) -> list[str]:
    """The documents of one text source."""
    if source.startswith("zoo:"):
        domain = source[4:]
        if domain not in DOMAINS:
            raise ConfigError("data.sources", f"unknown zoo domain {domain!r}", f"choose one of {', '.join(DOMAINS)}")
        return [doc.text for doc in build_corpus(zoo_corpus)[domain][0]]
    from datasets import load_dataset

    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        rows = load_dataset(name, split=split or "train")
    else:
        suffix = Path(source).suffix.lstrip(".")
        builder = {"jsonl": "json", "json": "json", "txt": "text", "parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ConfigError("data.sources", f"cannot read {source!r}", "use a .jsonl, .json, .txt or .parquet file")
        rows = load_dataset(builder, data_files=source, split="train")
    if field not in rows.column_names:
        raise ConfigError("data.field", f"{source} has no column {field!r}", f"choose one of {', '.join(rows.column_names)}")
    return [text for text in rows[field] if isinstance(text, str) and text]


def source_documents(source: str, data: Any, zoo_corpus, tokenizer, answer_model: Any, target_identity: Any) -> list[str]:
    """The documents of one source; for ``answers:<source>``, ``answer_model``'s transcripts over that source."""
    if not is_answers_source(source):
        return source_texts(source, data.field, zoo_corpus)
    if answer_model is None:
        raise ConfigError("data.sources", f"{source!r} cannot be used here", ANSWERS_FIX)
    inner = source[len(ANSWERS_PREFIX):]
    name, _, variant = inner.partition(":")
    if name == MAGPIE_SOURCE:
        magpie = variant_settings(variant, data.answer_prompts, data.seed)
        settings = AnswerSettings(prompts=data.answer_prompts, max_new_tokens=data.answer_tokens,
                                  batch_size=magpie.batch_size, seed=data.seed)
        return cached_self_chat(answer_model, tokenizer, settings, magpie, target_identity)
    settings = AnswerSettings(prompts=data.answer_prompts, max_new_tokens=data.answer_tokens, seed=data.seed)
    return cached_answers(answer_model, tokenizer, inner, source_texts(inner, data.field, zoo_corpus), settings,
                          target_identity)


def token_windows(tokenizer, data: Any, zoo_corpus, answer_model: Any = None, target_identity: Any = None) -> torch.Tensor:
    """``[samples, seq_len]`` token windows, spread evenly over the sources and over each source's stream.

    ``data`` has ``sources``, ``field``, ``samples``, ``seq_len`` and ``seed`` (and ``answer_prompts`` /
    ``answer_tokens`` when a source is ``answers:``, answered by ``answer_model``, cached under ``target_identity``).
    """
    streams = []
    for source in data.sources:
        ids: list[int] = []
        for text in source_documents(source, data, zoo_corpus, tokenizer, answer_model, target_identity):
            ids.extend(tokenizer(text)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        if len(ids) >= data.seq_len:
            streams.append(torch.tensor(ids, dtype=torch.long))
    if not streams:
        raise ValueError(f"no source in {list(data.sources)} has {data.seq_len} tokens of text")
    generator = torch.Generator().manual_seed(data.seed)
    rows = []
    for index in range(data.samples):
        stream = streams[index % len(streams)]
        start = int(torch.randint(0, len(stream) - data.seq_len + 1, (1,), generator=generator))
        rows.append(stream[start:start + data.seq_len])
    return torch.stack(rows)
