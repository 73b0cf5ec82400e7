"""Lookahead decoding (Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding",
ICML 2024): Jacobi iteration over a window of future positions gathers n-grams into a pool; the n-grams that start
with the last token are verified in the same forward pass. No draft model, no training.

State per request: a window of N - 1 levels of W tokens (``window_size`` W, ``ngram_size`` N), level 0's first
entry being the last committed token x (at position p), and the pool: per key token, at most G (``guesses``)
distinct (N - 1)-grams, least recently added evicted first.

One step is one target forward over x, the window and the candidate tree:

* **lookahead branch**: window token (l, i) sits at position p + l + i and sees the cache, level 0's tokens 0..i
  and its own column's tokens of levels 1..l; the last level's argmaxes are the Jacobi update ``new``;
* **verification branch**: the pool's n-grams keyed by x, merged into a token tree rooted at x (a node sees the
  cache and its ancestors), accepted by the shared tree rule (``strategies.verification.accept_tree``), so greedy
  output equals the target's and sampling keeps its distribution (the candidates are deterministic and distinct);
* the two branches never see each other; only the accepted path's cache entries are kept.

Then each column i adds the n-gram (level 0..N-2 of column i, ``new[i]``) to the pool under its first token, and
the window shifts one level: level 0 becomes level 1 (its first entry replaced by the next x), the last becomes
``new``. ``pool_from_prompt`` also adds every N-gram of the prompt and of the committed output (the reference's
``POOL_FROM_PROMPT``).

Where this differs from the reference code (hao-ai-lab/LookaheadDecoding): the window starts with every level
drawn at random from the prompt's tokens (seeded), instead of filling one level per step over N - 2 warm-up steps
that verify nothing; and a step that accepts a whole n-gram also commits the target's token after it (the
paper's rule; the reference drops it and commits at most N - 1). Like the reference, the window shifts by one
level per step however many tokens were accepted. Batch size 1 only.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.core.errors import ConfigError
from harness.core.lm import CausalLM, StepOutput
from harness.core.tree import tree_inputs
from strategies.base import StrategyParams
from strategies.engine import Proposer, ProposerStrategy, Verifier
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification, accept_tree, keep_path, tree_root


@dataclass(frozen=True)
class LookaheadParams(StrategyParams):
    """``window_size`` W, ``ngram_size`` N, ``guesses`` G (the most n-grams kept per key and verified per step),
    ``pool_from_prompt`` (seed the pool with the prompt's and the output's n-grams), ``seed`` (the window's
    initial tokens)."""

    window_size: int = 5
    ngram_size: int = 4
    guesses: int = 5
    pool_from_prompt: bool = False
    seed: int = 0

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.window_size < 1:
            yield ConfigError(f"{where}.window_size", f"must be >= 1, got {self.window_size}")
        if self.ngram_size < 2:
            yield ConfigError(f"{where}.ngram_size", f"must be >= 2, got {self.ngram_size}",
                              "an n-gram needs a key token and at least one guessed token")
        if self.guesses < 1:
            yield ConfigError(f"{where}.guesses", f"must be >= 1, got {self.guesses}")


class NgramPool:
    """Per key token, at most ``capacity`` distinct continuations (tuples), least recently added evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        """Add (or refresh) ``continuation`` under ``key``."""
        entries = self.entries.setdefault(key, OrderedDict())
        if continuation in entries:
            entries.move_to_end(continuation)
            return
        if len(entries) >= self.capacity:
            entries.popitem(last=False)
        entries[continuation] = None

    def add_text(self, tokens: list[int], size: int, ending_after: int = 0) -> None:
        """Add every ``size``-gram of ``tokens`` whose last token lies at index >= ``ending_after``."""
        for start in range(max(0, ending_after - size + 1), len(tokens) - size + 1):
            self.add(tokens[start], tuple(tokens[start + 1:start + size]))

    def candidates(self, key: int) -> list[tuple[int, ...]]:
        """The continuations kept under ``key``, least recently added first."""
        return list(self.entries.get(key, ()))

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.entries.values())


def candidate_tree(root: int, candidates: list[tuple[int, ...]], budget: int) -> tuple[list[int], list[int]]:
    """The candidates (each cut to ``budget`` tokens) merged into one token tree rooted at ``root``: (tokens,
    parents), node 0 the root."""
    tokens, parents = [root], [-1]
    children: dict[tuple[int, int], int] = {}
    for candidate in candidates:
        node = 0
        for token in candidate[:budget]:
            child = children.get((node, token))
            if child is None:
                child = len(tokens)
                tokens.append(token)
                parents.append(node)
                children[(node, token)] = child
            node = child
    return tokens, parents


@dataclass
class LookaheadProposal(Proposal):
    """The candidate tree plus the lookahead window verified beside it (``window[l][i]``; ``window[0][0]`` is the
    tree's root)."""

    window: list[list[int]] = field(default_factory=list)


@dataclass
class LookaheadVerification(Verification):
    """What the target kept, plus the lookahead branch's Jacobi update: the argmax after each of the last level's
    window tokens."""

    jacobi: list[int] = field(default_factory=list)


def window_inputs(window: list[list[int]], tree_nodes: int, committed: int) -> tuple[list[int], list[list[int]],
                                                                                      list[int], list[int]]:
    """The lookahead branch's part of the step's input, after the tree's ``tree_nodes`` (node 0 = the window's
    (0, 0)): its tokens, the input indices each sees within the step, their positions, and the input index of
    each last-level token."""
    levels, width = len(window), len(window[0])

    def index(level: int, column: int) -> int:
        if level == 0:
            return 0 if column == 0 else tree_nodes + column - 1
        return tree_nodes + width - 1 + (level - 1) * width + column

    tokens, sees, positions = [], [], []
    for level in range(levels):
        for column in range(width):
            if level == 0 and column == 0:
                continue  # the root, already in the tree
            tokens.append(window[level][column])
            sees.append([index(0, c) for c in range(column + 1)] + [index(l, column) for l in range(1, level + 1)])
            positions.append(committed + level + column)
    return tokens, sees, positions, [index(levels - 1, column) for column in range(width)]


def lookahead_forward(target: CausalLM, committed: int, proposal: "LookaheadProposal") -> tuple[StepOutput, list[int]]:
    """The step's one target forward over the candidate tree and the window after ``committed`` cached tokens
    (the module docstring's mask and positions); returns it and the input index of each last-level token."""
    nodes = len(proposal.tokens)
    extra, sees, extra_positions, last_level = window_inputs(proposal.window, nodes, committed)
    total = nodes + len(extra)
    tree_mask, tree_positions = tree_inputs(proposal.parents, committed)
    mask = torch.zeros(total, committed + total, dtype=torch.bool)
    mask[:, :committed] = True
    mask[:nodes, : committed + nodes] = tree_mask
    for row, seen in enumerate(sees, start=nodes):
        mask[row, [committed + index for index in seen]] = True
    positions = torch.cat([tree_positions, torch.tensor(extra_positions, dtype=torch.long)])
    out = target.extend(proposal.tokens + extra, attention_mask=mask.to(target.device),
                        position_ids=positions.to(target.device))
    return out, last_level


class LookaheadVerifier:
    """Verifies a ``LookaheadProposal``'s tree in ``lookahead_forward``, with the window beside it; a
    ``strategies.engine.Verifier``."""

    def __call__(self, target: CausalLM, sequence: list[int], proposal: Proposal, sampling: Sampling,
                 hidden_states: bool = False) -> Verification:
        if not isinstance(proposal, LookaheadProposal):
            raise TypeError("the lookahead verifier needs a LookaheadProposal")
        committed = tree_root(target, sequence, proposal, "lookahead")
        out, last_level = lookahead_forward(target, committed, proposal)
        nodes = len(proposal.tokens)
        path, following = accept_tree(proposal.tokens, proposal.parents, [1.0] * nodes,
                                      sampling.probs(out.logits[:nodes]), sampling)
        jacobi = out.logits[last_level].argmax(-1).tolist()
        kept = keep_path(target, committed, proposal, path, following, None)
        return LookaheadVerification(accepted=kept.accepted, tokens=kept.tokens, path=kept.path, jacobi=jacobi)


class LookaheadProposer(Proposer):
    """The window and n-gram pool of one request; proposes the pool's n-grams keyed by the last token."""

    first_token_from_prefill = True  # the step's root x is the last committed token, pending in the target's cache

    def __init__(self, params: LookaheadParams) -> None:
        self.params = params
        self.pool = NgramPool(params.guesses)
        self.window: list[list[int]] = []
        self.hits = 0

    def begin(self, prompt_ids: list[int], prefill: StepOutput | None, sequence: list[int]) -> None:
        rng = random.Random(self.params.seed)
        size = self.params.window_size
        self.window = [[rng.choice(prompt_ids) for _ in range(size)] for _ in range(self.params.ngram_size - 1)]
        self.pool = NgramPool(self.params.guesses)
        if self.params.pool_from_prompt:
            self.pool.add_text(sequence, self.params.ngram_size)
        self.hits = 0

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        root = sequence[-1]
        candidates = self.pool.candidates(root) if budget > 0 else []
        tokens, parents = candidate_tree(root, candidates, budget)
        window = [list(level) for level in self.window]
        window[0][0] = root
        return LookaheadProposal(tokens, parents=parents, window=window)

    def observe(self, sequence: list[int], verification: Verification) -> None:
        if not isinstance(verification, LookaheadVerification):
            raise TypeError("the lookahead proposer needs the lookahead verifier")
        window = [list(level) for level in self.window]
        window[0][0] = sequence[-1]
        for column, new in enumerate(verification.jacobi):
            self.pool.add(window[0][column], tuple(level[column] for level in window[1:]) + (new,))
        self.window = window[1:] + [verification.jacobi]
        self.hits += int(verification.accepted > 0)
        if self.params.pool_from_prompt:
            grown = sequence + verification.tokens
            self.pool.add_text(grown, self.params.ngram_size, ending_after=len(sequence))

    def extras(self) -> dict[str, Any]:
        return {"lookahead": {"pool_size": len(self.pool), "steps_with_accepted_guess": self.hits}}


@register("lookahead")
class Lookahead(ProposerStrategy):
    """Lookahead decoding: Jacobi iteration gathers n-grams, verified in the same forward pass."""

    Params = LookaheadParams

    def proposer(self) -> Proposer:
        return LookaheadProposer(self.params)

    def verifier(self) -> Verifier:
        return LookaheadVerifier()
