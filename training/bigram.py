"""The MaG bigram table: most frequent successor of every token, counted on the zoo corpus with a target's tokenizer.

An artefact of kind ``bigram`` like the trained ones: a sweep whose cascade
uses MaG gets one per target (``CascadeParams.implicit_artifacts``), built once
by the driver before the cells that need it and cached under
``$SPECSWEEP_HOME/artifacts/bigram/<key>/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig

from harness.core.corpus import DOMAINS, CorpusConfig, build_corpus
from harness.core.errors import ConfigError
from harness.core.models import ModelSpec, load_tokenizer, pretrained_location
from strategies.ngram import BigramTable
from training.artifacts import ArtifactKind
from training.launch import LaunchSettings
from training.settings import TrainSettings, parse_settings

TABLE_FILE = "table.json"


_FLUSH_PAIRS = 1 << 22  # pending pair keys merged into the running counts at a time


def _merge_counts(keys: torch.Tensor, counts: torch.Tensor, pending: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys``/``counts`` (distinct, sorted) with the pair keys in ``pending`` (one occurrence each) added."""
    all_keys = torch.cat([keys, *pending])
    all_counts = torch.cat([counts, torch.ones(len(all_keys) - len(keys), dtype=torch.int64)])
    merged, inverse = torch.unique(all_keys, sorted=True, return_inverse=True)
    return merged, torch.zeros(len(merged), dtype=torch.int64).index_add_(0, inverse, all_counts)


def count_bigrams(token_streams: list[list[int]], vocab_size: int) -> BigramTable:
    """The greedy bigram table of ``token_streams`` (a token never seen first maps to the most frequent token).

    Ids outside ``0 .. vocab_size-1`` are dropped before pairing. Counting is
    sparse: each adjacent pair is one int64 key ``prev * vocab_size + next``
    and only the distinct observed keys are counted, so memory is
    O(distinct pairs + vocab_size) and nothing vocab x vocab is ever built.
    Ties between successors go to the smaller token id (as a dense ``argmax``).
    """
    unigram = torch.zeros(vocab_size, dtype=torch.int64)
    keys = torch.zeros(0, dtype=torch.int64)
    counts = torch.zeros(0, dtype=torch.int64)
    pending: list[torch.Tensor] = []
    pending_size = 0
    for stream in token_streams:
        ids = torch.as_tensor(list(stream), dtype=torch.int64)
        ids = ids[(ids >= 0) & (ids < vocab_size)]
        if len(ids) < 2:
            continue
        unigram.index_add_(0, ids, torch.ones(len(ids), dtype=torch.int64))
        pending.append(ids[:-1] * vocab_size + ids[1:])
        pending_size += len(ids) - 1
        if pending_size >= _FLUSH_PAIRS:
            keys, counts = _merge_counts(keys, counts, pending)
            pending, pending_size = [], 0
    if pending:
        keys, counts = _merge_counts(keys, counts, pending)
    rows, successors = keys // vocab_size, keys % vocab_size
    # the largest count of every row, then the smallest successor id among the pairs reaching it
    row_max = torch.zeros(vocab_size, dtype=torch.int64).scatter_reduce_(0, rows, counts, "amax", include_self=False)
    top = counts == row_max[rows]
    best = torch.full((vocab_size,), vocab_size, dtype=torch.int64)
    best.scatter_reduce_(0, rows[top], successors[top], "amin", include_self=True)
    fallback = int(unigram.argmax())  # the first (smallest) id among the most frequent
    best[best == vocab_size] = fallback
    return BigramTable(tuple(best.tolist()))


@dataclass(frozen=True)
class BigramConfig(TrainSettings):
    """MaG's table for ``target``'s tokenizer, counted on at most ``max_chars`` characters of the zoo corpus.

    No job runs: ``launch`` only tells the driver what the build occupies (one CPU).
    """

    target: ModelSpec = ModelSpec("zoo:target")
    max_chars: int = 1_000_000
    launch: LaunchSettings = LaunchSettings(num_workers=1, cpus_per_worker=1, use_gpu="false")


def parse_bigram_config(raw: dict[str, Any], where: str, base_dir: Path, zoo_names: tuple[str, ...]) -> BigramConfig:
    """Validated bigram-table settings from a training-config mapping (``kind: bigram``)."""
    config = parse_settings(BigramConfig, raw, where, base_dir, zoo_names, allowed_note="kind")
    if config.max_chars < 1000:
        raise ConfigError(f"{where}.max_chars", f"must be >= 1000, got {config.max_chars}")
    return config


def corpus_texts(corpus: CorpusConfig, max_chars: int) -> list[str]:
    """Training documents of every zoo domain, an equal share of ``max_chars`` characters each."""
    texts = []
    for domain in DOMAINS:
        budget = max_chars // len(DOMAINS)
        for doc in build_corpus(corpus)[domain][0]:
            if budget <= 0:
                break
            texts.append(doc.text[:budget])
            budget -= len(texts[-1])
    return texts


def build_bigram(config: BigramConfig, zoo, out_dir: Path, target_key: str, name: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Count the table of ``config`` into ``out_dir/table.json``; return its size."""
    tokenizer = load_tokenizer(config.target, zoo)
    vocab_size = int(AutoConfig.from_pretrained(pretrained_location(config.target, zoo),
                                                revision=config.target.revision).vocab_size)
    streams = tokenizer(corpus_texts(zoo.corpus, config.max_chars))["input_ids"]
    table = count_bigrams(streams, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TABLE_FILE).write_text(json.dumps(list(table.next_token)))
    log(f"  MaG bigram table: {sum(len(stream) for stream in streams):,} tokens, vocabulary {vocab_size}")
    return {"tokens": sum(len(stream) for stream in streams), "vocab_size": vocab_size}


def load_bigram(directory: Path) -> BigramTable:
    """The table a ``bigram`` artefact holds."""
    return BigramTable(tuple(json.loads((directory / TABLE_FILE).read_text())))


KIND = ArtifactKind("bigram", parse_bigram_config, build_bigram, lambda request, target: load_bigram(request.directory))
