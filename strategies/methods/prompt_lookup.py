"""Prompt lookup decoding (Saxena 2023): draft by copying what followed the current n-gram earlier in the text.

The draft is deterministic, so its distribution is one-hot; the speculative
sampling rule with a one-hot q accepts token x with probability p(x) and
otherwise resamples from p with x removed, which keeps the target's
distribution exactly. Greedy decoding keeps tokens while they match the argmax.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from harness.core.errors import ConfigError
from strategies.base import StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer, RowwiseProposer
from strategies.engine import Proposer, ProposerStrategy
from strategies.ngram import find_continuation
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal


@dataclass(frozen=True)
class PromptLookupParams(StrategyParams):
    """``num_tokens`` drafted per match; n-gram sizes tried from ``max_ngram`` down to ``min_ngram``."""

    num_tokens: int = 10
    max_ngram: int = 3
    min_ngram: int = 1

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.num_tokens < 1:
            yield ConfigError(f"{where}.num_tokens", f"must be >= 1, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            yield ConfigError(f"{where}.min_ngram", f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                              f"{self.max_ngram}")


class PromptLookupProposer(Proposer):
    """Up to ``num_tokens`` tokens copied from what followed the current n-gram earlier in the text."""

    def __init__(self, params: PromptLookupParams) -> None:
        self.params = params

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        if budget <= 0:
            return Proposal([])
        return Proposal(find_continuation(sequence, min(self.params.num_tokens, budget), self.params.max_ngram,
                                          self.params.min_ngram))


@register("prompt_lookup")
class PromptLookup(ProposerStrategy, BatchCapable):
    """Draft by n-gram lookup in the prompt and the text generated so far; verify with the target."""

    Params = PromptLookupParams

    def proposer(self) -> Proposer:
        return PromptLookupProposer(self.params)

    def batch_proposer(self) -> BatchProposer:
        return RowwiseProposer(lambda: PromptLookupProposer(self.params))
