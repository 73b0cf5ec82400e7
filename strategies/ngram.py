"""Statistical drafting shared by ``prompt_lookup`` and CS Drafting's MaG: n-gram suffix matching and bigram fill."""

from __future__ import annotations

from dataclasses import dataclass


def find_continuation(tokens: list[int], count: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """Up to ``count`` tokens that followed the first earlier occurrence of the longest suffix of ``tokens``.

    Suffix lengths are tried from ``max_ngram`` down to ``min_ngram``; the
    suffix's own position at the end does not count as an occurrence.
    """
    length = len(tokens)
    for size in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - size:]
        first = suffix[0]
        for start in range(length - size):
            if tokens[start] == first and tokens[start:start + size] == suffix:
                return tokens[start + size:start + size + count]
    return []


@dataclass(frozen=True)
class BigramTable:
    """Most frequent next token for every token id (CS Drafting's greedy bigram model)."""

    next_token: tuple[int, ...]

    def chain(self, last: int, count: int) -> list[int]:
        """``count`` tokens following ``last`` by repeatedly taking the most frequent successor."""
        tokens = []
        for _ in range(count):
            last = self.next_token[last] if 0 <= last < len(self.next_token) else self.next_token[0]
            tokens.append(last)
        return tokens


def mag_propose(tokens: list[int], count: int, table: BigramTable, max_ngram: int) -> list[int]:
    """MaG: copy what followed the longest earlier match of the current suffix, then fill with the bigram chain."""
    proposal = find_continuation(tokens, count, max_ngram)
    if len(proposal) < count:
        last = proposal[-1] if proposal else tokens[-1]
        proposal = proposal + table.chain(last, count - len(proposal))
    return proposal
