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


def count_bigrams(token_streams: list[list[int]], vocab_size: int) -> BigramTable:
    """The greedy bigram table of ``token_streams`` (a token never seen first maps to the most frequent token)."""
    counts = torch.zeros(vocab_size * vocab_size, dtype=torch.int64)
    unigram = torch.zeros(vocab_size, dtype=torch.int64)
    for stream in token_streams:
        ids = torch.tensor([t for t in stream if 0 <= t < vocab_size], dtype=torch.int64)
        if len(ids) < 2:
            continue
        counts.index_add_(0, ids[:-1] * vocab_size + ids[1:], torch.ones(len(ids) - 1, dtype=torch.int64))
        unigram.index_add_(0, ids, torch.ones(len(ids), dtype=torch.int64))
    counts = counts.view(vocab_size, vocab_size)
    best = counts.argmax(dim=1)
    seen = counts.sum(dim=1) > 0
    fallback = int(unigram.argmax())
    return BigramTable(tuple(int(b) if s else fallback for b, s in zip(best, seen)))


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
