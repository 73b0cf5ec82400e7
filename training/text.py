"""Training text: documents from the zoo's domains, a Hugging Face dataset or a local file, cut into token windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import ConfigError


def source_texts(source: str, field: str, zoo_corpus) -> list[str]:
    """The documents of one text source."""
    if source.startswith("zoo:"):
        from harness.corpus import DOMAINS, build_corpus

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


def token_windows(tokenizer, data: Any, zoo_corpus) -> torch.Tensor:
    """``[samples, seq_len]`` token windows, spread evenly over the sources and over each source's stream.

    ``data`` has ``sources``, ``field``, ``samples``, ``seq_len`` and ``seed``.
    """
    streams = []
    for source in data.sources:
        ids: list[int] = []
        for text in source_texts(source, data.field, zoo_corpus):
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
