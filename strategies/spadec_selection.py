"""SpaDec's acceptance predictor and its acceptance-guided path selection over a draft tree.

The predictor is a linear layer and a sigmoid on the target's hidden state as it enters layer K (after the
pre-verification layers), giving each draft-tree node the probability that verification will accept it. The
selection keeps the root-to-leaf path that the remaining layers verify:

1. prune every non-root node whose predicted probability is below the mean over the non-root nodes (with its
   subtree: a node survives only if its parent does);
2. among the root-to-leaf paths of what is left, take the one maximising Σ p(node) · w(depth(node)), where
   w(d) = ln(d + 1) for d < 3 and sech(d - 3) from depth 3 on (early positions count more as they are likelier
   to be reached; deep ones fade), by dynamic programming from the leaves up.

SpaDec's public code never reaches this path (its branch needs ``retrieve_indices``, which is never passed); this
module follows the paper's description instead.
"""

from __future__ import annotations

import math

import torch

from harness.core.tree import node_depths


def depth_weight(depth: int) -> float:
    """w(d) = ln(d + 1) for d < 3, sech(d - 3) for d >= 3 (w(0) = 0: the root is committed, not drafted)."""
    if depth < 3:
        return math.log(depth + 1)
    return 1.0 / math.cosh(depth - 3)


def prune_below_mean(parents: list[int], probabilities: list[float]) -> list[bool]:
    """Which nodes survive pruning: the root, and every node at or above the mean non-root probability whose
    parent survives."""
    if len(parents) <= 1:
        return [True] * len(parents)
    mean = sum(probabilities[1:]) / (len(probabilities) - 1)
    kept = [True]
    for node in range(1, len(parents)):
        kept.append(kept[parents[node]] and probabilities[node] >= mean)
    return kept


def select_path(parents: list[int], probabilities: list[float]) -> list[int]:
    """The root-to-leaf path (node indices, root first) of the pruned tree maximising Σ p · w(depth).

    ``parents[0]`` is -1 (the root) and every parent precedes its children; ``probabilities[i]`` is the
    predictor's probability that node i is accepted (the root's is ignored). Ties go to the earlier child.
    """
    depths = node_depths(parents)
    kept = prune_below_mean(parents, probabilities)
    value = [probabilities[node] * depth_weight(depths[node]) if node else 0.0 for node in range(len(parents))]
    total = _path_values(parents, value, kept)
    path = [0]
    while True:
        children = [child for child in range(1, len(parents)) if parents[child] == path[-1] and kept[child]]
        if not children:
            return path
        path.append(max(children, key=lambda child: (total[child], -child)))


def _path_values(parents: list[int], value: list[float], kept: list[bool]) -> list[float]:
    """For each kept node, the best Σ value over paths from it down to a leaf of the kept tree."""
    total = list(value)
    best_below = [0.0] * len(parents)
    for node in range(len(parents) - 1, 0, -1):  # a node's children all come after it
        total[node] = value[node] + best_below[node]
        if kept[node]:
            parent = parents[node]
            best_below[parent] = max(best_below[parent], total[node])
    total[0] = value[0] + best_below[0]
    return total


class AcceptancePredictor(torch.nn.Module):
    """p(accepted | hidden state entering layer K) = sigmoid(w · h + b), per draft-tree node."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Acceptance probabilities ``[...]`` for hidden states ``[..., hidden]``."""
        return torch.sigmoid(self.linear(hidden).squeeze(-1))

    def loss(self, hidden: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the predictions against accept (1) / reject (0) labels."""
        logits = self.linear(hidden).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, accepted.float())
