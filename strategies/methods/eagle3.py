"""EAGLE-3 (Li et al. 2025): EAGLE-2's dynamic draft tree, drafted by an EAGLE-3 head (``strategies.eagle3_head``)
that reads the target's fused low-, middle- and high-layer features and feeds itself its own hidden state deeper.

The proposer is EAGLE-2's (``strategies.methods.eagle.TreeHeadProposer``): the head keeps one entry per target
position, rebuilt after each verification from the target's real features of the accepted tokens, and each tree
level is one head pass. What changes is what the target hands over: every prefill and verification returns the
concatenated hidden states entering the head's three fused layers (2, L // 2 and L - 3 unless its config names
others: ``head_feature_layers``), which the head's ``fc`` projects; deeper nodes carry the head's own h. The tree
is verified by the shared tree verifier, so greedy output equals the target's and sampling keeps its distribution.

At batch size B > 1 the batched tree proposer of EAGLE-2 (``BatchedTreeHeadProposer``) drafts every row's level in
one head pass over a batched cache, with the batched target handing over the same fused features.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from harness.core.batched_lm import BatchedCausalLM
from harness.core.lm import CausalLM
from strategies.batched_engine import BatchCapable, BatchProposer
from strategies.eagle3_head import head_feature_layers, load_eagle3_lm
from strategies.engine import Proposer, ProposerStrategy
from strategies.methods.eagle import BatchedTreeHeadProposer, Eagle2Params, TreeHeadProposer
from strategies.registry import register


@dataclass(frozen=True)
class Eagle3Params(Eagle2Params):
    """The head (``head``, a ``train`` entry of kind ``eagle3``, or ``head_dir``, a saved or published EAGLE-3
    head) and EAGLE-2's tree budget, with the reference's EAGLE-3 depth (7)."""

    depth: int = 7


class Eagle3TreeProposer(TreeHeadProposer):
    """EAGLE-2's tree proposer over an EAGLE-3 head, asking the target for its fused features (``layers``)."""

    def __init__(self, head: CausalLM, params: Eagle3Params, layers: tuple[int, ...]) -> None:
        super().__init__(head, params)
        self.needs_hidden_states = layers


class BatchedEagle3TreeProposer(BatchedTreeHeadProposer):
    """EAGLE-2's batched tree proposer over an EAGLE-3 head, asking the batched target for its fused features."""

    def __init__(self, head: BatchedCausalLM, params: Eagle3Params, layers: tuple[int, ...]) -> None:
        super().__init__(head, params)
        self.needs_hidden_states = layers


@register("eagle3")
class Eagle3(ProposerStrategy, BatchCapable):
    """EAGLE-3: fused multi-layer features, a head trained with training-time test, EAGLE-2's dynamic tree."""

    Params = Eagle3Params

    @functools.cached_property
    def head(self) -> CausalLM:
        """The head: the sweep's trained artefact, or loaded once from ``head_dir``."""
        if self.params.head:
            return self.models.artifact(self.params.head)
        return load_eagle3_lm(Path(self.params.head_dir).expanduser(), self.models.target)

    def feature_layers(self) -> tuple[int, ...]:
        """The target's layers whose entering states the head reads, fused (as the head's config names them)."""
        return head_feature_layers(self.head.model.config, int(self.models.target.model.config.num_hidden_layers))

    def proposer(self) -> Proposer:
        return Eagle3TreeProposer(self.head, self.params, self.feature_layers())

    def batch_proposer(self) -> BatchProposer:
        return BatchedEagle3TreeProposer(BatchedCausalLM.of(self.head), self.params, self.feature_layers())
