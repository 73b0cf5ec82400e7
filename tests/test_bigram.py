"""MaG's bigram table: sparse counting equals a dense count, and scales to large vocabularies."""

from __future__ import annotations

import random

import pytest
import torch

from training import bigram
from training.bigram import count_bigrams


def dense_reference(streams: list[list[int]], vocab_size: int) -> tuple[int, ...]:
    """A plain vocab x vocab count: most frequent successor (smallest id on ties), else the most frequent token."""
    counts = [[0] * vocab_size for _ in range(vocab_size)]
    unigram = [0] * vocab_size
    for stream in streams:
        ids = [t for t in stream if 0 <= t < vocab_size]
        if len(ids) < 2:
            continue
        for prev, nxt in zip(ids, ids[1:]):
            counts[prev][nxt] += 1
        for token in ids:
            unigram[token] += 1
    fallback = max(range(vocab_size), key=lambda t: (unigram[t], -t))
    return tuple(max(range(vocab_size), key=lambda t: (row[t], -t)) if any(row) else fallback for row in counts)


def test_ties_and_unseen_tokens():
    # 0 is followed by 2 and 1 once each: the smaller id wins; 3 and 4 never come first
    table = count_bigrams([[0, 2, 0, 1], [1, 3]], vocab_size=5)
    assert table.next_token == dense_reference([[0, 2, 0, 1], [1, 3]], 5)
    assert table.next_token[0] == 1
    # unigram tie between 0 and 1 (2 each): the fallback is the smaller id
    assert table.next_token[3] == table.next_token[4] == 0
    # out-of-range ids are dropped before pairing; a stream left with one token counts nothing
    assert count_bigrams([[1, 9, 2, -1, 1, 2], [4]], vocab_size=5).next_token == (1, 2, 1, 1, 1)
    assert count_bigrams([], vocab_size=3).next_token == (0, 0, 0)


@pytest.mark.parametrize("flush", [None, 3])
@pytest.mark.parametrize("seed", range(8))
def test_sparse_count_equals_dense_reference(monkeypatch, seed, flush):
    if flush is not None:  # merge the pending pairs into the running counts every few pairs
        monkeypatch.setattr(bigram, "_FLUSH_PAIRS", flush)
    rng = random.Random(seed)
    vocab_size = rng.randint(1, 40)
    streams = [[rng.randint(-2, vocab_size + 1) for _ in range(rng.randint(0, 30))] for _ in range(rng.randint(0, 6))]
    table = count_bigrams(streams, vocab_size)
    assert len(table.next_token) == vocab_size
    assert table.next_token == dense_reference(streams, vocab_size)


def test_large_vocabulary_planted_pairs():
    vocab_size = 200_000  # a dense table would be 320 GB of int64
    generator = torch.Generator().manual_seed(0)
    planted = {7: 12, 123_456: 5, 199_999: 0}
    streams = []
    for _ in range(10):
        ids = torch.randint(1, vocab_size, (100_000,), generator=generator)
        ids[ids == 42] = 43  # 42 never occurs: it maps to the most frequent token
        stream = ids.tolist()
        for prev, nxt in planted.items():
            stream += [prev, nxt] * 5  # 50 occurrences over the ten streams; a random pair occurs once or twice
        streams.append(stream)
    table = count_bigrams(streams, vocab_size)
    assert len(table.next_token) == vocab_size
    for prev, nxt in planted.items():
        assert table.next_token[prev] == nxt
    unigram = torch.bincount(torch.tensor([t for s in streams for t in s]), minlength=vocab_size)
    assert table.next_token[42] == int(unigram.argmax())
    # a token seen once as a predecessor maps to its only successor
    first = streams[0]
    once = next(i for i in range(len(first) - 1) if int(unigram[first[i]]) == 1)
    assert table.next_token[first[once]] == first[once + 1]
