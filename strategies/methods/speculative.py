"""Classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023) as a proposer: a small draft model.

The draft proposes ``gamma`` tokens one at a time (or, with ``schedule:
adaptive``, the number a measured cost model expects to be fastest, up to
``gamma``; see ``strategies.draft_length``), with the distribution each was
chosen from; the shared loop verifies them in one target pass with
``strategies.verification.accept_chain`` (greedy: argmax match; sampling:
min(1, p/q) acceptance, residual resampling, a bonus token after full
acceptance), so the output is distributed exactly as the target's own decoding.
Both KV caches are cropped back to the accepted prefix, never recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from harness.core.batched_lm import BatchedCausalLM, BatchPrefill
from harness.core.errors import ConfigError
from harness.core.lm import CausalLM
from strategies.base import ModelSet, StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer
from strategies.draft_length import CostModelLength, DraftLength
from strategies.engine import Proposer, ProposerStrategy
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification


@dataclass(frozen=True)
class SpeculativeParams(StrategyParams):
    """``draft``: a name from the sweep's ``models.drafts``; ``gamma``: tokens drafted per step, or with
    ``schedule: adaptive`` the most a step may draft (``constant`` always drafts ``gamma``)."""

    SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "adaptive")
    added_later: ClassVar[tuple[str, ...]] = ("schedule",)

    draft: str
    gamma: int = 4
    schedule: str = "constant"

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.gamma < 1:
            yield ConfigError(f"{where}.gamma", f"must be >= 1, got {self.gamma}", "draft at least one token per step")
        if self.schedule not in self.SCHEDULES:
            yield ConfigError(f"{where}.schedule", f"unknown schedule {self.schedule!r}",
                              f"choose one of {', '.join(self.SCHEDULES)}")

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
    if sampling.greedy:
        return greedy_draft(draft, logits, count), []
    tokens, probs = [], []
    for index in range(count):
        q = sampling.probs(logits)
        token = sampling.choose(q)
        tokens.append(token)
        probs.append(q)
        if index + 1 < count:
            logits = draft.extend([token]).logits[-1]
    return tokens, probs


def greedy_draft(draft: CausalLM, logits: torch.Tensor, count: int) -> list[int]:
    """``count`` greedy tokens of ``draft`` from ``logits`` on: each argmax stays on the device and feeds the next
    forward, so the draft costs one device-to-host transfer, not one per token (and no distribution: greedy
    verification reads none)."""
    chosen = [logits.argmax(-1, keepdim=True)]
    while len(chosen) < count:
        chosen.append(draft.extend(chosen[-1]).logits[-1].argmax(-1, keepdim=True))
    return torch.cat(chosen).tolist()


class DraftModelProposer(Proposer):
    """Tokens from a draft model, as many as ``length`` says each step; the draft keeps exactly the accepted
    prefix in its cache.

    ``length``: a ``DraftLength`` or a fixed count. ``continue_cache``: the draft's cache already holds a prefix
    of each prompt (a previous turn); the rest is fed with the first proposal instead of a prefill.
    """

    def __init__(self, draft: CausalLM, length: DraftLength | int, continue_cache: bool = False) -> None:
        self.draft, self.continue_cache = draft, continue_cache
        self.length = length if isinstance(length, DraftLength) else DraftLength(length)
        self.drafted = 0  # tokens drafted in the step being verified

    def begin(self, prompt_ids: list[int], prefill, sequence: list[int]) -> None:
        if not self.continue_cache:
            self.draft.prefill(prompt_ids)

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        count = min(self.length.next(), budget)
        self.drafted = max(count, 0)
        if count <= 0:
            return Proposal([])
        tokens, probs = draft_tokens(self.draft, sequence, count, sampling)
        return Proposal(tokens, q=torch.stack(probs) if probs else None)

    def observe(self, sequence: list[int], verification: Verification) -> None:
        self.length.observe(self.drafted, verification.accepted)
        self.draft.crop(min(self.draft.length, len(sequence) + verification.accepted))

    def models(self) -> dict[str, CausalLM]:
        return {"draft": self.draft}

    def extras(self) -> dict[str, Any]:
        summary = self.length.summary()
        return {"draft_length": summary} if summary else {}


class BatchedDraftProposer(BatchProposer):
    """``DraftModelProposer`` for a batch: the draft's batched cache drafts up to ``length`` tokens per row (one
    length for the whole batch each step), one batched forward per drafted position, and keeps exactly each row's
    accepted prefix.

    ``length``: a fixed count, or a ``DraftLength`` for the batch (``schedule: adaptive``: costs measured at the
    batch's size, α counted over every row's steps); ``for_batch`` gives it the size of each new batch.
    """

    def __init__(self, draft: BatchedCausalLM, length: int | Callable[[int], DraftLength]) -> None:
        self.draft = draft
        self.for_batch = length if callable(length) else (lambda batch_size: DraftLength(length))
        self.length: DraftLength = DraftLength(0)
        self.counts: list[int] = []  # what each row drafted in the step being verified

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        self.length = self.for_batch(len(prompts))
        self.draft.prefill(prompts)

    def propose(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        length = self.length.next()
        counts = [max(0, min(length, budget)) for budget in budgets]
        self.counts = counts
        lengths = self.draft.lengths
        feed = [sequence[lengths[row]:] if counts[row] else [] for row, sequence in enumerate(sequences)]
        tokens: list[list[int]] = [[] for _ in sequences]
        probs: list[list[torch.Tensor]] = [[] for _ in sequences]
        for index in range(max(counts, default=0)):
            if any(feed):  # the rows' pending tokens first, then each row's newest draft token
                self.draft.extend(feed)
            logits = self.draft.last_logits
            for row, count in enumerate(counts):
                if index < count:
                    q = sampling.probs(logits[row])
                    tokens[row].append(sampling.choose(q))
                    probs[row].append(q)
            feed = [[tokens[row][-1]] if index + 1 < count else [] for row, count in enumerate(counts)]
        return [Proposal(row_tokens, q=torch.stack(row_probs)) if row_tokens else Proposal([])
                for row_tokens, row_probs in zip(tokens, probs)]

    def observe(self, sequences: list[list[int]], verifications: list[Verification | None]) -> None:
        for drafted, verification in zip(self.counts, verifications):
            if verification is not None:
                self.length.observe(drafted, verification.accepted)
        lengths = self.draft.lengths
        self.draft.crop([length if verification is None else min(length, len(sequence) + verification.accepted)
                         for length, sequence, verification in zip(lengths, sequences, verifications)])

    def models(self) -> dict[str, BatchedCausalLM]:
        return {"draft": self.draft}

    def extras(self) -> dict[str, Any]:
        summary = self.length.summary()
        return {"draft_length": summary} if summary else {}


@register("speculative")
class Speculative(ProposerStrategy, BatchCapable):
    """Draft ``gamma`` tokens with a small model, verify them with the target in one pass."""

    Params = SpeculativeParams

    def __init__(self, params: SpeculativeParams, models: ModelSet) -> None:
        super().__init__(params, models)
        self.adaptive_length: CostModelLength | None = None  # measured on the cell's first prompt, then kept
        self.batch_lengths: dict[int, CostModelLength] = {}  # likewise at each batch size, on its first batch

    def proposer(self) -> Proposer:
        draft = self.models.draft(self.params.draft)
        if self.params.schedule == "constant":
            return DraftModelProposer(draft, self.params.gamma)
        if self.adaptive_length is None:
            self.adaptive_length = CostModelLength.calibrate(self.models.target, draft, self.params.gamma)
        return DraftModelProposer(draft, self.adaptive_length)

    def prepare(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """With ``schedule: adaptive``, measure the costs at this batch's size before its first timed run."""
        if self.params.schedule != "constant" and len(prompts) > 1:
            self.batch_length(len(prompts))

    def batch_length(self, batch_size: int) -> DraftLength:
        """The batch's draft length: ``gamma``, or the adaptive schedule with costs measured at ``batch_size``
        rows (once per cell and batch size)."""
        if self.params.schedule == "constant":
            return DraftLength(self.params.gamma)
        if batch_size not in self.batch_lengths:
            self.batch_lengths[batch_size] = CostModelLength.calibrate_batched(
                BatchedCausalLM.of(self.models.target), BatchedCausalLM.of(self.models.draft(self.params.draft)),
                self.params.gamma, batch_size)
        return self.batch_lengths[batch_size]

    def batch_proposer(self) -> BatchProposer:
        return BatchedDraftProposer(BatchedCausalLM.of(self.models.draft(self.params.draft)), self.batch_length)
