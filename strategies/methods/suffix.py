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

``global_tree: true`` adds SuffixDecoding's global tree: a second trie over the outputs of the requests this
cell decoded before (its warm-up prompts included; each output a document of its own, so no suffix spans two).
Each step speculates from both tries and keeps the higher-scoring tree (ties: the request's own). The global tree
grows in the order a cell decodes its prompts, so a cell's τ depends on that order and on its shard, and is
repeatable for both. At batch size > 1 a batch's rows read the tree as it was before the batch and their outputs
join it after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.core.batched_lm import BatchPrefill
from harness.core.errors import ConfigError
from harness.core.lm import StepOutput
from strategies.base import ModelSet, StrategyParams, Trace
from strategies.batched_engine import BatchCapable, BatchProposer, BatchTrace, RowwiseProposer
from strategies.engine import Proposer, ProposerStrategy
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.suffix_trie import Speculation, SuffixTrie
from strategies.verification import Proposal, Verification


@dataclass(frozen=True)
class SuffixParams(StrategyParams):
    """``max_depth``: the trie's depth (the longest pattern plus what follows it); ``max_spec_tokens``: the most
    tokens one step drafts; a match of p tokens drafts at most ``max_spec_factor * p + max_spec_offset``;
    ``min_token_prob``: the least estimated acceptance of a drafted node; ``tree``: a tree, or one path;
    ``global_tree``: also draft from the outputs of the cell's earlier requests."""

    max_depth: int = 24
    max_spec_tokens: int = 16
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    tree: bool = True
    global_tree: bool = False

    added_later: ClassVar[tuple[str, ...]] = ("global_tree",)

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

    def __init__(self, params: SuffixParams, outputs: SuffixTrie | None = None) -> None:
        self.params = params
        self.trie = SuffixTrie(params.max_depth)
        self.outputs = outputs  # the global tree over earlier requests' outputs (read only here)
        self.matched: list[int] = []  # the pattern length behind each step's draft (0: nothing drafted)
        self.from_outputs = 0  # steps whose draft came from the global tree

    def begin(self, prompt_ids: list[int], prefill: StepOutput | None, sequence: list[int]) -> None:
        self.trie = SuffixTrie(self.params.max_depth)
        self.trie.extend(sequence)
        self.matched = []
        self.from_outputs = 0

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        speculation = Speculation()
        if budget > 0:
            speculation = best_speculation(self.trie, sequence, budget, self.params)
            if self.outputs is not None:
                earlier = best_speculation(self.outputs, sequence, budget, self.params)
                if earlier.tokens and earlier.score > speculation.score:
                    speculation = earlier
                    self.from_outputs += 1
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
        stats = {"drafting_steps": len(drafted), "searched_steps": len(self.matched),
                 "mean_pattern": sum(drafted) / len(drafted) if drafted else None}
        if self.outputs is not None:
            stats["global_tree_steps"] = self.from_outputs
        return {"suffix": stats}


class BatchedSuffixProposer(RowwiseProposer):
    """One ``SuffixProposer`` per row; every row's first token is the target's pick after its prefill (nothing
    drafted), as at batch size 1."""

    def __init__(self, params: SuffixParams, outputs: SuffixTrie | None = None) -> None:
        super().__init__(lambda: SuffixProposer(params, outputs))
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

    def __init__(self, params: SuffixParams, models: ModelSet) -> None:
        super().__init__(params, models)
        self.outputs = SuffixTrie(params.max_depth) if params.global_tree else None

    def proposer(self) -> Proposer:
        return SuffixProposer(self.params, self.outputs)

    def batch_proposer(self) -> BatchProposer:
        return BatchedSuffixProposer(self.params, self.outputs)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        trace = super().generate(prompt_ids, max_new_tokens, sampling)
        self.remember([trace.tokens])
        return trace

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                       clock: Callable[[], float] | None = None) -> BatchTrace:
        traces = super().generate_batch(prompts, max_new_tokens, sampling, clock)
        self.remember([row.tokens for row in traces.rows])
        return traces

    def remember(self, outputs: list[list[int]]) -> None:
        """Add finished requests' outputs to the global tree (when there is one), one document each."""
        if self.outputs is None:
            return
        for tokens in outputs:
            self.outputs.extend(tokens)
            self.outputs.end_document()
