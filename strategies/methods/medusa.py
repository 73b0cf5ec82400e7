"""Medusa-1 (Cai et al. 2024): K heads on the target's last hidden state propose the tokens 2..K+1 places ahead;
their top-ranked tokens form a fixed sparse candidate tree, verified in one tree-masked target pass.

Each step the root is the last committed token (the target's own pick after the previous verification, pending in
its cache) and head k's candidates sit at depth k + 1: a tree node is a path of ranks ``(r_1, ..., r_d)``, its token
head d's ``r_d``-th most likely token. The tree (``choices``) is fixed for a run. Given, it is a published Medusa
choice list; otherwise it is built as Medusa builds its sparse trees: from each head's rank accuracies measured on
held-out data at training time (the probability that the head's r-th token is the right one), nodes are added
greedily by expected acceptance (the product of their ranks' accuracies along the path) up to ``total_tokens``.
Published heads without measured accuracies fall back to a prior of 1 / (r + 1) per rank, decayed 0.8 per depth.

Verification is the shared tree verifier (``strategies.verification.verify_tree``): greedy output equals the
target's, and sampling keeps its distribution (a node's children are distinct tokens chosen deterministically).
Medusa's typical acceptance, which is lossy, is not offered.

At batch size B > 1 the heads read every row's last hidden state in one pass and each row gets the same tree of
its own candidates; the batched target verifies every row's tree in one pass (``strategies.batched_engine``).
"""

from __future__ import annotations

import functools
import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.core.batched_lm import BatchPrefill
from harness.core.errors import ConfigError
from harness.core.lm import CausalLM, ForwardStats, StepOutput
from strategies.base import StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer
from strategies.engine import Proposer, ProposerStrategy
from strategies.medusa_heads import MedusaHeads, load_heads
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification

PRIOR_DECAY = 0.8


@dataclass(frozen=True)
class MedusaParams(StrategyParams):
    """``heads`` (a ``train`` entry) or ``heads_dir`` (saved or published heads); the tree: ``choices`` (a
    published Medusa choice list of rank paths) or ``total_tokens`` nodes (root included) built from the heads'
    rank accuracies over their ``top_k`` best tokens."""

    heads: str = ""
    heads_dir: str = ""
    total_tokens: int = 16
    top_k: int = 4
    choices: tuple[tuple[int, ...], ...] = ()

    def problems(self, where: str) -> Iterator[ConfigError]:
        if bool(self.heads) == bool(self.heads_dir):
            yield ConfigError(f"{where}.heads", "give exactly one of heads (a train entry) or heads_dir (a directory)",
                              "e.g. heads: medusa with train: {medusa: train/medusa_zoo.yaml}")
        if self.heads_dir and not Path(self.heads_dir).expanduser().is_dir():
            yield ConfigError(f"{where}.heads_dir", f"{self.heads_dir} is not a directory",
                              "give a directory with config.json and medusa_lm_head.safetensors (or .pt)")
        for name, low in (("total_tokens", 2), ("top_k", 1)):
            if getattr(self, name) < low:
                yield ConfigError(f"{where}.{name}", f"must be >= {low}, got {getattr(self, name)}")
        paths = {tuple(path) for path in self.choices}
        for path in self.choices:
            if not path or any(rank < 0 for rank in path) or (len(path) > 1 and tuple(path[:-1]) not in paths):
                yield ConfigError(f"{where}.choices", f"path {list(path)} is empty, negative or lacks its parent",
                                  "list every node's rank path, each with its prefix, e.g. [[0], [1], [0, 0]]")
                break

    def uses_artifacts(self) -> list[str]:
        return [self.heads] if self.heads else []


def prior_accuracy(num_heads: int, top_k: int) -> list[list[float]]:
    """Rank accuracies to build a tree from when none were measured: 1 / (r + 1), times 0.8 per head."""
    return [[PRIOR_DECAY ** head / (rank + 1) for rank in range(top_k)] for head in range(num_heads)]


def sparse_tree(accuracy: list[list[float]], size: int) -> list[tuple[int, ...]]:
    """The ``size`` rank paths of highest expected acceptance (the product of ``accuracy[depth][rank]`` along the
    path), added greedily from the root, parents before children."""
    chosen: list[tuple[int, ...]] = []
    frontier = [(-accuracy[0][rank], (rank,)) for rank in range(len(accuracy[0]))]
    heapq.heapify(frontier)
    while frontier and len(chosen) < size:
        negative, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < len(accuracy):
            for rank, value in enumerate(accuracy[len(path)]):
                heapq.heappush(frontier, (negative * value, path + (rank,)))
    return sorted(chosen, key=lambda path: (len(path), path))


class MedusaHeadsLM:
    """The heads as a counted model: their forward passes and seconds, like a ``CausalLM``'s, for the cost model."""

    def __init__(self, heads: MedusaHeads) -> None:
        self.heads = heads
        self.name = "medusa-heads"
        self.num_parameters = heads.own_parameters()
        self.stats = ForwardStats()

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[num_heads, ..., vocab]`` of the heads on ``hidden`` (``[hidden]``, or ``[rows, hidden]``)."""
        started = time.perf_counter()
        logits = self.heads(hidden.to(self.heads.heads[0][-1].weight.dtype)).float()
        self.stats.count(False, time.perf_counter() - started, hidden.shape[0] if hidden.dim() > 1 else 1)
        return logits

    def reset_stats(self) -> ForwardStats:
        stats, self.stats = self.stats, ForwardStats()
        return stats


Ranking = tuple[list[list[float]], list[list[int]]]  # per head: log-probabilities and ids of its top tokens


def rank_candidates(logits: torch.Tensor, top: int) -> tuple[list, list]:
    """Each head's ``top`` tokens and their log-probabilities, as lists shaped like ``logits`` without its last axis
    (``[depth, vocab]`` for one row, ``[depth, rows, vocab]`` for a batch), plus a last axis of ``top``."""
    values, ranked = torch.log_softmax(logits, dim=-1).topk(top, dim=-1)
    return values.tolist(), ranked.tolist()


def candidate_tree(root: int, ranking: Ranking | None, choices: list[tuple[int, ...]], budget: int) -> Proposal:
    """The tree ``choices`` over the heads' ranked tokens (``ranking``: head k's at row k) after ``root``, its
    paths no deeper than ``budget``; scored by cumulative head log-probability. Without a ranking, the root alone."""
    tokens, parents, scores = [root], [-1], [0.0]
    if ranking is None:
        return Proposal(tokens, parents=parents, scores=scores)
    values, ranked = ranking
    index = {(): 0}
    for path in choices:
        depth = len(path)
        if depth > budget:
            continue
        parent = index[path[:-1]]
        index[path] = len(tokens)
        tokens.append(ranked[depth - 1][path[-1]])
        parents.append(parent)
        scores.append(scores[parent] + values[depth - 1][path[-1]])
    return Proposal(tokens, parents=parents, scores=scores)


class MedusaProposer(Proposer):
    """The heads' candidates after the last committed token, laid out as the fixed tree ``choices``."""

    needs_hidden_states = True
    first_token_from_prefill = True

    def __init__(self, heads: MedusaHeadsLM, choices: list[tuple[int, ...]]) -> None:
        self.heads, self.choices = heads, choices
        self.top = max(rank for path in choices for rank in path) + 1
        self.depth = max(len(path) for path in choices)
        self.hidden: torch.Tensor | None = None  # the target's last hidden state before the root

    def begin(self, prompt_ids: list[int], prefill: StepOutput, sequence: list[int]) -> None:
        self.hidden = prefill.hidden_states[-1]

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        ranking = rank_candidates(self.heads(self.hidden)[: self.depth], self.top) if budget > 0 else None
        return candidate_tree(sequence[-1], ranking, self.choices, budget)

    def observe(self, sequence: list[int], verification: Verification) -> None:
        self.hidden = verification.hidden_states[-1]

    def models(self) -> dict[str, Any]:
        return {"heads": self.heads}

    def extras(self) -> dict[str, Any]:
        return {"tree": True}


class BatchedMedusaProposer(BatchProposer):
    """``MedusaProposer`` for a batch: the heads read every row's last hidden state in one pass.

    The first step drafts nothing: each row's first token is the target's own pick after its prompt, and the
    prompt's last hidden state stays the one before that token, the next step's root.
    """

    needs_hidden_states = True

    def __init__(self, heads: MedusaHeadsLM, choices: list[tuple[int, ...]]) -> None:
        self.heads, self.choices = heads, choices
        self.top = max(rank for path in choices for rank in path) + 1
        self.depth = max(len(path) for path in choices)
        self.hidden: torch.Tensor | None = None  # [batch, hidden]: each row's target hidden state before its root
        self.started = False

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        self.hidden = torch.stack([states[-1] for states in prefill.hidden_states])
        self.started = False

    def propose(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        if not self.started:
            return [Proposal([]) for _ in sequences]  # the first token comes from the target's prefill
        if not any(budget > 0 for budget in budgets):
            return [candidate_tree(sequence[-1], None, self.choices, 0) for sequence in sequences]
        values, ranked = rank_candidates(self.heads(self.hidden)[: self.depth], self.top)  # all rows at once
        return [candidate_tree(sequence[-1], ([head[row] for head in values], [head[row] for head in ranked])
                               if budget > 0 else None, self.choices, budget)
                for row, (sequence, budget) in enumerate(zip(sequences, budgets))]

    def observe(self, sequences: list[list[int]], verifications: list[Verification | None]) -> None:
        if not self.started:
            self.started = True
            return
        self.hidden = self.hidden.clone()
        for row, verification in enumerate(verifications):
            if verification is not None:
                self.hidden[row] = verification.hidden_states[-1]

    def models(self) -> dict[str, Any]:
        return {"heads": self.heads}

    def extras(self) -> dict[str, Any]:
        return {"tree": True}


@register("medusa")
class Medusa(ProposerStrategy, BatchCapable):
    """Medusa-1: K heads on the target's last hidden state, a fixed sparse candidate tree verified in one pass."""

    Params = MedusaParams

    @functools.cached_property
    def heads(self) -> MedusaHeads:
        """The heads: the sweep's trained artefact, or loaded once from ``heads_dir``."""
        if self.params.heads:
            return self.models.artifact(self.params.heads)
        target: CausalLM = self.models.target
        return load_heads(Path(self.params.heads_dir).expanduser(), target.device)

    def choices(self) -> list[tuple[int, ...]]:
        """The candidate tree's paths of ranks: the given ``choices``, or the sparse tree from the heads' accuracies."""
        heads = self.heads
        choices = [tuple(path) for path in self.params.choices]
        if not choices:
            accuracy = heads.rank_accuracy or prior_accuracy(heads.num_heads, self.params.top_k)
            accuracy = [row[: self.params.top_k] for row in accuracy]
            choices = sparse_tree(accuracy, self.params.total_tokens - 1)
        if max(len(path) for path in choices) > heads.num_heads:
            raise ConfigError("strategies.medusa.choices", f"a path is deeper than the {heads.num_heads} heads",
                              "keep every path at most as long as the number of heads")
        return choices

    def proposer(self) -> Proposer:
        return MedusaProposer(MedusaHeadsLM(self.heads), self.choices())

    def batch_proposer(self) -> BatchProposer:
        return BatchedMedusaProposer(MedusaHeadsLM(self.heads), self.choices())
