"""The MaG bigram table: most frequent successor of every token, counted on the zoo corpus with a target's tokenizer.

Cached as an artefact under ``$SPECSWEEP_HOME/artifacts/bigram-<hash>.json``,
keyed by the tokenizer's vocabulary and the corpus settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from harness.corpus import DOMAINS, CorpusConfig, build_corpus
from harness.paths import content_hash, specsweep_home
from strategies.ngram import BigramTable


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


@functools.lru_cache(maxsize=4)
def _cached(key: str, tokenizer_fn, corpus: CorpusConfig, vocab_size: int, max_chars: int) -> BigramTable:
    path = specsweep_home() / "artifacts" / f"bigram-{key}.json"
    if path.exists():
        return BigramTable(tuple(json.loads(path.read_text())))
    texts = []
    for domain in DOMAINS:
        budget = max_chars // len(DOMAINS)
        for doc in build_corpus(corpus)[domain][0]:
            if budget <= 0:
                break
            texts.append(doc.text[:budget])
            budget -= len(texts[-1])
    streams = tokenizer_fn(texts)["input_ids"]
    table = count_bigrams(streams, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(table.next_token)))
    tmp.replace(path)
    return table


def bigram_table(tokenizer, corpus: CorpusConfig, vocab_size: int, max_chars: int = 1_000_000) -> BigramTable:
    """The bigram table for ``tokenizer`` on the zoo corpus, built once and cached on disk."""
    vocab = tokenizer.get_vocab()
    key = content_hash([sorted(vocab.items()), dataclasses.asdict(corpus), vocab_size, max_chars])[:16]
    return _cached(key, tokenizer, corpus, vocab_size, max_chars)
