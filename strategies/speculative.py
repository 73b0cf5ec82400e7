"""Classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023) as a proposer: a small draft model.

The draft proposes ``gamma`` tokens one at a time, with the distribution each
was chosen from; the shared loop verifies them in one target pass with
``strategies.verification.accept_chain`` (greedy: argmax match; sampling:
min(1, p/q) acceptance, residual resampling, a bonus token after full
acceptance), so the output is distributed exactly as the target's own decoding.
Both KV caches are cropped back to the accepted prefix, never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import ConfigError
from harness.lm import CausalLM
from strategies.base import StrategyParams
from strategies.engine import Proposer, ProposerStrategy
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification


@dataclass(frozen=True)
class SpeculativeParams(StrategyParams):
    """``draft``: a name from the sweep's ``models.drafts``; ``gamma``: tokens drafted per step."""

    draft: str
    gamma: int = 4

    def validate(self, where: str) -> None:
        if self.gamma < 1:
            raise ConfigError(f"{where}.gamma", f"must be >= 1, got {self.gamma}", "draft at least one token per step")

    def uses_drafts(self) -> list[str]:
        return [self.draft]


def draft_tokens(draft: CausalLM, sequence: list[int], count: int, sampling: Sampling) -> tuple[list[int], list[torch.Tensor]]:
    """Let ``draft`` propose ``count`` tokens after ``sequence``; return them with their draft distributions.

    The draft's cache is first extended with whatever of ``sequence`` it has not
    processed yet (the previous step's correction or bonus token), in the same
    forward pass that yields the first proposal.
    """
    pending = sequence[draft.length:]
    logits = draft.extend(pending).logits[-1] if pending else draft.last_logits
    tokens, probs = [], []
    for index in range(count):
        q = sampling.probs(logits)
        token = sampling.choose(q)
        tokens.append(token)
        probs.append(q)
        if index + 1 < count:
            logits = draft.extend([token]).logits[-1]
    return tokens, probs


class DraftModelProposer(Proposer):
    """``gamma`` tokens from a draft model, which keeps exactly the accepted prefix in its cache.

    ``continue_cache``: the draft's cache already holds a prefix of each prompt
    (a previous turn); the rest is fed with the first proposal instead of a prefill.
    """

    def __init__(self, draft: CausalLM, gamma: int, continue_cache: bool = False) -> None:
        self.draft, self.gamma, self.continue_cache = draft, gamma, continue_cache

    def begin(self, prompt_ids: list[int], prefill, sequence: list[int]) -> None:
        if not self.continue_cache:
            self.draft.prefill(prompt_ids)

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        count = min(self.gamma, budget)
        if count <= 0:
            return Proposal([])
        tokens, probs = draft_tokens(self.draft, sequence, count, sampling)
        return Proposal(tokens, q=torch.stack(probs))

    def observe(self, sequence: list[int], verification: Verification) -> None:
        self.draft.crop(min(self.draft.length, len(sequence) + verification.accepted))

    def models(self) -> dict[str, CausalLM]:
        return {"draft": self.draft}


@register("speculative")
class Speculative(ProposerStrategy):
    """Draft ``gamma`` tokens with a small model, verify them with the target in one pass."""

    Params = SpeculativeParams

    def proposer(self) -> Proposer:
        return DraftModelProposer(self.models.draft(self.params.draft), self.params.gamma)
