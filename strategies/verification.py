"""Verifiers: score a draft with the target in one forward pass and apply the exact acceptance rule.

A draft (``Proposal``) is a chain of tokens, each with the draft distribution it
was chosen from (or none: a deterministic draft such as prompt lookup, whose
distribution is one-hot), or a tree whose node 0 is the last committed token.

Both verifiers keep one invariant of the target's KV cache: before a step it
holds the committed sequence, possibly minus its last token (that token is then
fed with the draft); after the step it holds the sequence plus the accepted
draft tokens, and the token that follows them (the correction or bonus token)
is left for the next step. A tree needs the last token pending (its root).

The rejection samplers here are the only ones in specsweep: ``accept_chain``
(Leviathan et al. / Chen et al. speculative sampling; greedy: argmax match) and
``accept_tree`` (EAGLE-2's deterministic top-k children; see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core.lm import CausalLM, HiddenStates
from harness.core.tree import greedy_path, tree_inputs
from strategies.sampling import Sampling


@dataclass
class Proposal:
    """A draft: ``tokens`` of a chain, or of a tree's nodes (node 0 the root) when ``parents`` is given.

    ``q`` holds a chain's draft distributions, one row per token, or ``None``
    for a deterministic draft (one-hot). ``scores`` orders a tree's children
    (highest first) for the sampling rule.
    """

    tokens: list[int]
    q: torch.Tensor | None = None
    parents: list[int] | None = None
    scores: list[float] | None = None

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    @property
    def drafted(self) -> int:
        """Drafted tokens: a chain's length, or a tree's nodes without the root."""
        return len(self.tokens) - 1 if self.is_tree else len(self.tokens)


@dataclass
class Verification:
    """What the target kept: ``accepted`` draft tokens, then ``tokens`` = those plus the token after them.

    ``hidden_states`` (when asked for) holds the target's last hidden state
    before each of ``tokens`` (EAGLE's features); ``path`` a tree's accepted nodes,
    root first.
    """

    accepted: int
    tokens: list[int]
    hidden_states: torch.Tensor | None = None
    path: list[int] | None = None


def accept_chain(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, drafted: list[int],
                 sampling: Sampling) -> tuple[int, int]:
    """Speculative-sampling acceptance of ``drafted``; returns (accepted count, the token that follows them).

    ``target_probs`` has ``len(drafted) + 1`` rows (the target's distribution
    before each drafted token, plus the one after the last); ``draft_probs`` one
    row per drafted token (unused, and may be None, when greedy). A token x is
    kept with probability min(1, p(x)/q(x)); after a rejection the next token is
    drawn from norm(max(0, p - q)); after full acceptance from the last row (the
    bonus token). Greedy: argmax match.
    """
    if sampling.greedy:  # the argmax of every row in one device-to-host transfer
        best = target_probs.argmax(-1).tolist()
        accepted = next((index for index, token in enumerate(drafted) if token != best[index]), len(drafted))
        return accepted, best[accepted]
    for index, token in enumerate(drafted):
        p, q = target_probs[index], draft_probs[index]
        if sampling.uniform(p.device) * float(q[token]) < float(p[token]):
            continue
        residual = torch.clamp(p - q, min=0.0)
        total = float(residual.sum())
        # p == q up to rounding: any draw from p is exact then.
        return index, sampling.draw(residual / total if total > 0 else p)
    return len(drafted), sampling.choose(target_probs[len(drafted)])


def accept_tree(tokens: list[int], parents: list[int], scores: list[float], p_rows: torch.Tensor,
                sampling: Sampling) -> tuple[list[int], int]:
    """Walk a verified tree from the root; return the accepted node path and the token that follows it.

    Greedy: follow the child equal to the target's argmax. Sampling: the
    EAGLE-2 reference accepts a child x with probability p(x)/q(x), which is
    exact only for children *sampled* from q, but EAGLE-2 picks them
    deterministically (top-k). The rule here is exact for deterministic, distinct
    candidates: visit the children by score, accept child x with probability
    p(x) under the current residual p, otherwise zero p(x) and renormalise; if
    all are rejected, draw from the residual.
    """
    if sampling.greedy:  # the argmax of every node in one device-to-host transfer
        return greedy_path(tokens, parents, p_rows.argmax(-1).tolist())
    children: dict[int, list[int]] = {}
    for index in range(1, len(tokens)):
        children.setdefault(parents[index], []).append(index)
    path = [0]
    while True:
        residual = p_rows[path[-1]].clone()
        following = None
        for child in sorted(children.get(path[-1], []), key=lambda i: -scores[i]):
            token = tokens[child]
            total = float(residual.sum())
            if total <= 0:
                break
            if sampling.uniform(residual.device) * total < float(residual[token]):
                following = child
                break
            residual[token] = 0.0
        if following is None:
            total = float(residual.sum())
            return path, sampling.draw(residual / total if total > 0 else p_rows[path[-1]])
        path.append(following)


def verify_chain(target: CausalLM, sequence: list[int], proposal: Proposal, sampling: Sampling,
                 hidden_states: HiddenStates = False) -> Verification:
    """Score a chain after ``sequence`` in one target pass, accept by ``accept_chain`` and crop the target's cache.

    With nothing drafted it is a plain target step. Hidden states need the
    sequence's last token pending in the cache (the EAGLE layout).
    """
    drafted = proposal.tokens
    pending = sequence[target.length:]
    before = target.last_logits  # the distribution after the cached sequence (extend replaces it)
    hidden = None
    if not pending and not drafted:
        logits = before[None]
    else:
        out = target.extend(pending + drafted, output_hidden_states=hidden_states)
        if pending:
            logits = out.logits[len(pending) - 1:]
            if hidden_states:
                hidden = out.hidden_states[len(pending) - 1:]
        else:
            if hidden_states:
                raise ValueError("verify_chain: hidden states need the sequence's last token pending in the cache")
            logits = torch.cat([before[None], out.logits])
    if sampling.greedy:  # accept_chain's greedy rule on the logits themselves: one argmax, one transfer
        best = logits.argmax(-1).tolist()
        accepted = next((index for index, token in enumerate(drafted) if token != best[index]), len(drafted))
        following = best[accepted]
    else:
        p_rows = sampling.probs(logits)
        if drafted:
            q_rows = proposal.q
            if q_rows is None:  # a deterministic draft's distribution is one-hot
                q_rows = torch.nn.functional.one_hot(torch.tensor(drafted, device=target.device),
                                                     target.vocab_size).float()
            accepted, following = accept_chain(p_rows, q_rows, drafted, sampling)
        else:
            accepted, following = 0, sampling.choose(p_rows[-1])
    target.crop(len(sequence) + accepted)
    return Verification(accepted=accepted, tokens=drafted[:accepted] + [following],
                        hidden_states=None if hidden is None else hidden[: accepted + 1])


def tree_root(target: CausalLM, sequence: list[int], proposal: Proposal, verifier: str) -> int:
    """The committed length before a tree rooted at ``sequence``'s last token; ``ValueError`` unless the target's
    cache holds the sequence minus that token (the tree layout)."""
    committed = len(sequence) - 1
    if target.length != committed or proposal.tokens[0] != sequence[-1]:
        raise ValueError(f"{verifier}: the target's cache must hold the sequence minus its last token, the tree's root")
    return committed


def keep_path(target: CausalLM, committed: int, proposal: Proposal, path: list[int], following: int,
              hidden_states: torch.Tensor | None) -> Verification:
    """Keep the accepted ``path``'s cache entries (nodes of ``proposal``, root first) after the ``committed``
    sequence, and say what was accepted; ``hidden_states`` are the target's, one row per path node."""
    target.keep(list(range(committed)) + [committed + node for node in path])
    return Verification(accepted=len(path) - 1, tokens=[proposal.tokens[node] for node in path[1:]] + [following],
                        hidden_states=hidden_states, path=path)


def verify_tree(target: CausalLM, sequence: list[int], proposal: Proposal, sampling: Sampling,
                hidden_states: HiddenStates = False) -> Verification:
    """Score a tree rooted at ``sequence``'s last token in one tree-masked pass; keep the accepted path's cache."""
    committed = tree_root(target, sequence, proposal, "verify_tree")
    mask, positions = tree_inputs(proposal.parents, committed, target.device)
    out = target.extend(proposal.tokens, attention_mask=mask, position_ids=positions, output_hidden_states=hidden_states)
    path, following = accept_tree(proposal.tokens, proposal.parents, proposal.scores or [0.0] * len(proposal.tokens),
                                  sampling.probs(out.logits), sampling)
    return keep_path(target, committed, proposal, path, following, out.hidden_states[path] if hidden_states else None)


def verify(target: CausalLM, sequence: list[int], proposal: Proposal, sampling: Sampling,
           hidden_states: HiddenStates = False) -> Verification:
    """The verifier for ``proposal``'s shape: ``verify_tree`` for a tree, ``verify_chain`` for a chain."""
    check = verify_tree if proposal.is_tree else verify_chain
    return check(target, sequence, proposal, sampling, hidden_states)
