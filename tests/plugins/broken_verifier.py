"""Test plugin: a deliberately broken lossless strategy. ``broken_speculative`` is ``speculative`` whose
verifier, once per turn, replaces the token after the accepted draft (the target's own pick) by the token the
target ranks second, where the target prefers its first by more than ``margin`` logits: the kind of bug the
tie-aware lossless check must catch as a real divergence, never as a tie."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.divergence import last_logits
from strategies.methods.speculative import Speculative, SpeculativeParams
from strategies.registry import register
from strategies.verification import verify


@dataclass(frozen=True)
class BrokenParams(SpeculativeParams):
    """``margin``: the smallest top-1 over top-2 logit gap at which the second token is wrongly accepted."""

    margin: float = 2.0


@register("broken_speculative")
class BrokenSpeculative(Speculative):
    """``speculative`` with the broken verifier above."""

    Params = BrokenParams

    def verifier(self):
        state = {"broken": False}

        def broken(target, sequence, proposal, sampling, hidden):
            verification = verify(target, sequence, proposal, sampling, hidden)
            if not state["broken"] and not proposal.is_tree:
                top = last_logits(target.model, sequence + verification.tokens[:-1]).topk(2)
                if float(top.values[0] - top.values[1]) > self.params.margin:
                    verification.tokens[-1] = int(top.indices[1])
                    state["broken"] = True
            return verification

        return broken
