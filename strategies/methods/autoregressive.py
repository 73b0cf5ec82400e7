"""The baseline: one target forward pass per token, through the same wrapper, cache and loop as every strategy."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.base import StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer, RowwiseProposer
from strategies.engine import Proposer, ProposerStrategy
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal


@dataclass(frozen=True)
class AutoregressiveParams(StrategyParams):
    """The baseline takes no parameters."""


class NothingProposer(Proposer):
    """Drafts nothing: every step is one plain target forward."""

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        return Proposal([])


@register("autoregressive")
class Autoregressive(ProposerStrategy, BatchCapable):
    """Plain decoding with the target: prefill, then one cached forward per new token."""

    Params = AutoregressiveParams

    def proposer(self) -> Proposer:
        return NothingProposer()

    def batch_proposer(self) -> BatchProposer:
        return RowwiseProposer(lambda: NothingProposer())
