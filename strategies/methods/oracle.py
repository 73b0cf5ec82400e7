"""Synthetic acceptance: an ``oracle`` proposer that drafts the target's own greedy continuation, each drafted token
right with a set probability, to measure what the system costs apart from any draft's quality.

Like vLLM's synthetic acceptance mode, it separates the two halves of a speedup: the acceptance a draft reaches,
and what the harness, the target and the machine make of a given acceptance. Drafting costs nothing (the
continuation is computed before the run, untimed, by ``prepare``), so a sweep over ``acceptance`` and ``gamma``
measures the verification side alone and, against Leviathan's bound at the same α, the efficiency surface of the
machine (the report's "Synthetic acceptance" section).

At draft position i a token is the target's own with probability ``acceptance`` (or
``acceptance_by_position[i]``) when the tokens before it were, and a wrong one (the target's token + 1)
otherwise: under greedy verification the accepted prefix then has exactly that conditional acceptance per
position. It is greedy only, and it is an instrument, not a method: it never enters the speedup leaderboard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from harness.core.errors import ConfigError
from harness.core.metrics import speedup_bound
from harness.core.tables import ReportView, markdown_table
from strategies.base import StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer, RowwiseProposer
from strategies.engine import Proposer, ProposerStrategy
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal


@dataclass(frozen=True)
class OracleParams(StrategyParams):
    """``gamma`` tokens drafted per step; each is right with probability ``acceptance`` given the ones before it
    were (``acceptance_by_position`` sets it per position instead, its last value holding for later ones)."""

    gamma: int = 4
    acceptance: float = 0.8
    acceptance_by_position: tuple[float, ...] = ()

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.gamma < 1:
            yield ConfigError(f"{where}.gamma", f"must be >= 1, got {self.gamma}", "draft at least one token per step")
        if not 0.0 <= self.acceptance <= 1.0:
            yield ConfigError(f"{where}.acceptance", f"must be a probability in [0, 1], got {self.acceptance}")
        for index, value in enumerate(self.acceptance_by_position):
            if not 0.0 <= value <= 1.0:
                yield ConfigError(f"{where}.acceptance_by_position[{index}]",
                                  f"must be a probability in [0, 1], got {value}")

    def check_sampling(self, temperature: float, where: str) -> None:
        if temperature > 0:
            raise ConfigError(f"{where}.name", "oracle drafts the target's greedy continuation, so it runs greedy only",
                              "set run.temperature: 0")

    def at(self, position: int) -> float:
        """The acceptance probability at draft position ``position`` (0-based)."""
        by_position = self.acceptance_by_position
        return by_position[min(position, len(by_position) - 1)] if by_position else self.acceptance


class OracleProposer(Proposer):
    """Drafts from the target's greedy continuations of the run's prompts (``Oracle.prepare``)."""

    def __init__(self, params: OracleParams, continuations: dict[tuple[int, ...], list[int]], vocab_size: int) -> None:
        self.params, self.continuations, self.vocab_size = params, continuations, vocab_size
        self.prompt: tuple[int, ...] = ()

    def begin(self, prompt_ids: list[int], prefill, sequence: list[int]) -> None:
        self.prompt = tuple(prompt_ids)

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        truth = self.continuations[self.prompt][len(sequence) - len(self.prompt):]
        device = sampling.generator.device if sampling.generator is not None else torch.device("cpu")
        tokens, right = [], True
        for position in range(min(self.params.gamma, budget, len(truth))):
            right = right and sampling.uniform(device) < self.params.at(position)
            tokens.append(truth[position] if right else (truth[position] + 1) % self.vocab_size)
        return Proposal(tokens)


def oracle_section(view: ReportView) -> list[str]:
    """Synthetic acceptance: measured speedup, τ and α against the configured acceptance and γ, with Leviathan's
    bound at the measured α and the efficiency (measured / bound)."""
    frame = view.groups[view.groups["strategy"] == "oracle"]
    if frame.empty:
        return []
    rows = []
    for row in frame.itertuples():
        raw = row.params_raw
        bound = speedup_bound(row.alpha, row.drafted_per_step, 1.0, 0.0)
        rows.append({**({"target": row.target} if view.multi_target else {}), "prompt_set": row.prompt_set,
                     "batch_size": getattr(row, "batch_size", 1), "acceptance": raw.get("acceptance"),
                     "by_position": ", ".join(f"{v:g}" for v in raw.get("acceptance_by_position") or ()) or "-",
                     "gamma": raw.get("gamma"), "alpha": row.alpha, "tau": row.tau,
                     "speedup": f"{row.speedup:.2f} [{row.speedup_low:.2f}, {row.speedup_high:.2f}]",
                     "free_bound": bound, "efficiency": row.speedup / bound if row.alpha is not None else None})
    table = pd.DataFrame(rows).sort_values([c for c in ("target", "prompt_set", "batch_size", "gamma", "acceptance")
                                            if c in rows[0]])
    columns = {**view.target_column(), "prompt_set": "prompt set", "batch_size": "B", "gamma": "γ",
               "acceptance": "set acceptance", "by_position": "set by position", "alpha": "measured α", "tau": "τ",
               "speedup": "speedup (95% CI)", "free_bound": "bound (free draft)", "efficiency": "efficiency"}
    return ["## Synthetic acceptance (oracle)", "",
            "Not a method: the `oracle` drafts the target's own greedy continuation, each drafted token right with "
            "the set probability, at no drafting cost. Its speedup is what this machine and harness make of that "
            "acceptance; the bound is Leviathan's for a free draft, (1 - α^(γ+1)) / (1 - α), and efficiency is the "
            "speedup over it (what verifying γ + 1 tokens costs beyond one step, plus the loop's own work).", "",
            markdown_table(table, columns), ""]


@register("oracle")
class Oracle(ProposerStrategy, BatchCapable):
    """Drafts the target's greedy continuation with synthetic per-position acceptance (an instrument)."""

    Params = OracleParams
    leaderboard = False
    report_section = staticmethod(oracle_section)

    def __init__(self, params: OracleParams, models) -> None:
        super().__init__(params, models)
        self.continuations: dict[tuple[int, ...], list[int]] = {}

    def prepare(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """The target's greedy continuation of each prompt, computed before the timed run; its forward passes are
        not counted."""
        target = self.models.target
        self.continuations = {}
        for prompt in prompts:
            out = target.prefill(prompt)
            tokens: list[int] = []
            while len(tokens) < max_new_tokens:
                tokens.append(int(out.logits[-1].argmax()))
                if tokens[-1] in target.eos_token_id:
                    break
                out = target.extend(tokens[-1:])
            self.continuations[tuple(prompt)] = tokens
        target.reset()
        target.reset_stats()

    def proposer(self) -> Proposer:
        return OracleProposer(self.params, self.continuations, self.models.target.vocab_size)

    def batch_proposer(self) -> BatchProposer:
        return RowwiseProposer(self.proposer)
