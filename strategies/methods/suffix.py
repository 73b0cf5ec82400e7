"""Suffix drafting (SuffixDecoding, Oliaro et al. 2024; the same family as SAM-decoding): draft what followed the
current suffix of the text wherever it occurred before, as a frequency-scored tree, without any model.

A per-request suffix trie (``strategies.suffix_trie.SuffixTrie``, depth ``max_depth``) holds the prompt and every
committed token. Each step, every suffix of the sequence that occurred earlier with a continuation is a match of
length p; each match grows SuffixDecoding's greedy speculation tree of at most ``max_spec_factor * p +
max_spec_offset`` tokens (and ``max_spec_tokens``), adding nodes by estimated acceptance D (the product of
continuation frequencies along the path) while D >= ``min_token_prob``. The tree with the highest score (the sum
of D, the expected accepted tokens; ties: the longer match) is verified in one tree-masked target pass
(``strategies.verification.verify_tree``). ``tree: false`` speculates one path instead (a chain).

The candidates are deterministic and a node's children are distinct tokens, so ``accept_tree``'s rule keeps the
target's distribution exactly when sampling, and greedy output equals the target's. No training.

Where this differs from SuffixDecoding: its global tree over earlier requests' outputs is not built here (each
request drafts from its own prompt and output only; cells in a sweep are independent and repeatable).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harness.core.batched_lm import BatchPrefill
from harness.core.errors import ConfigError
from harness.core.lm import StepOutput
from strategies.base import StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer, RowwiseProposer
from strategies.engine import Proposer, ProposerStrategy
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.suffix_trie import Speculation, SuffixTrie
from strategies.verification import Proposal, Verification


@dataclass(frozen=True)
class SuffixParams(StrategyParams):
    """``max_depth``: the trie's depth (the longest pattern plus what follows it); ``max_spec_tokens``: the most
    tokens one step drafts; a match of p tokens drafts at most ``max_spec_factor * p + max_spec_offset``;
    ``min_token_prob``: the least estimated acceptance of a drafted node; ``tree``: a tree, or one path."""

    max_depth: int = 24
    max_spec_tokens: int = 16
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    tree: bool = True

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.max_depth < 2:
            yield ConfigError(f"{where}.max_depth", f"must be >= 2, got {self.max_depth}",
                              "a pattern of one token plus one drafted token needs 2")
        if self.max_spec_tokens < 1:
            yield ConfigError(f"{where}.max_spec_tokens", f"must be >= 1, got {self.max_spec_tokens}")
        if self.max_spec_factor <= 0:
            yield ConfigError(f"{where}.max_spec_factor", f"must be > 0, got {self.max_spec_factor}",
                              "SuffixDecoding uses 1 to 4 tokens per matched token")
        if not 0 <= self.min_token_prob <= 1:
            yield ConfigError(f"{where}.min_token_prob", f"must be in [0, 1], got {self.min_token_prob}")


def best_speculation(trie: SuffixTrie, sequence: list[int], budget: int, params: SuffixParams) -> Speculation:
    """The highest-scoring speculation over every match of a suffix of ``sequence`` (ties: the longer match)."""
    best = Speculation()
    for length, node in trie.matches(sequence, params.max_depth - 1):
        limit = min(budget, params.max_spec_tokens,
                    math.floor(params.max_spec_factor * length + params.max_spec_offset))
        if limit < 1:
            continue
        speculation = trie.speculate(node, length, limit, params.min_token_prob, chain=not params.tree)
        if speculation.tokens and speculation.score >= best.score:
            best = speculation
    return best


class SuffixProposer(Proposer):
    """SuffixDecoding's speculation from a per-request trie over the prompt and the committed tokens."""

    first_token_from_prefill = True  # a tree needs the sequence's last token pending in the target's cache

    def __init__(self, params: SuffixParams) -> None:
        self.params = params
        self.trie = SuffixTrie(params.max_depth)
        self.matched: list[int] = []  # the pattern length behind each step's draft (0: nothing drafted)

    def begin(self, prompt_ids: list[int], prefill: StepOutput | None, sequence: list[int]) -> None:
        self.trie = SuffixTrie(self.params.max_depth)
        self.trie.extend(sequence)
        self.matched = []

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        speculation = Speculation()
        if budget > 0:
            speculation = best_speculation(self.trie, sequence, budget, self.params)
            self.matched.append(speculation.pattern_length)
        if not self.params.tree:
            return Proposal(speculation.tokens)
        parents = [-1, *(parent + 1 for parent in speculation.parents)]
        return Proposal([sequence[-1], *speculation.tokens], parents=parents,
                        scores=[1.0, *speculation.probs])

    def observe(self, sequence: list[int], verification: Verification) -> None:
        self.trie.extend(verification.tokens)

    def extras(self) -> dict[str, Any]:
        drafted = [length for length in self.matched if length]
        return {"suffix": {"drafting_steps": len(drafted), "searched_steps": len(self.matched),
                           "mean_pattern": sum(drafted) / len(drafted) if drafted else None}}


class BatchedSuffixProposer(RowwiseProposer):
    """One ``SuffixProposer`` per row; every row's first token is the target's pick after its prefill (nothing
    drafted), as at batch size 1."""

    def __init__(self, params: SuffixParams) -> None:
        super().__init__(lambda: SuffixProposer(params))
        self.started = False

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        super().begin(prompts, prefill)
        self.started = False

    def propose(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        if not self.started:
            self.started = True
            return [Proposal([]) for _ in sequences]
        return super().propose(sequences, budgets, sampling)

    def row_extras(self, row: int) -> dict[str, Any]:
        return self.rows[row].extras()


@register("suffix")
class SuffixDrafting(ProposerStrategy, BatchCapable):
    """Model-free drafting from a suffix trie of the prompt and output (SuffixDecoding); verified as a tree."""

    Params = SuffixParams

    def proposer(self) -> Proposer:
        return SuffixProposer(self.params)

    def batch_proposer(self) -> BatchProposer:
        return BatchedSuffixProposer(self.params)
