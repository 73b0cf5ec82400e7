"""Token trees for tree verification (EAGLE-2, SpaDec): attention masks, position ids, greedy path acceptance.

A tree is given by ``parents``: node 0 is the root (the last committed token,
not yet in the target's cache, parent -1); every other node's parent comes
before it. Verifying the tree is one forward pass over all nodes in which
each node attends to the cache and to its own ancestors, at position
``past + depth``. Afterwards the accepted path's cache entries are kept and
the rest dropped (``CausalLM.keep``).
"""

from __future__ import annotations

import torch


def node_depths(parents: list[int]) -> list[int]:
    """Depth of every node (the root has depth 0)."""
    depths: list[int] = []
    for index, parent in enumerate(parents):
        if index == 0:
            if parent != -1:
                raise ValueError("node 0 must be the root (parent -1)")
            depths.append(0)
        elif not 0 <= parent < index:
            raise ValueError(f"node {index} has parent {parent}; parents must come before their children")
        else:
            depths.append(depths[parent] + 1)
    return depths


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """``[n, n]`` booleans: entry (i, j) is True when node j is node i or one of its ancestors."""
    count = len(parents)
    mask = torch.zeros(count, count, dtype=torch.bool)
    for index, parent in enumerate(parents):
        mask[index, index] = True
        if parent >= 0:
            mask[index] |= mask[parent]
    return mask


def tree_inputs(parents: list[int], past: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[n, past + n]`` attention mask and ``[n]`` position ids for verifying the tree after ``past`` cached tokens."""
    tree = ancestor_mask(parents)
    mask = torch.cat([torch.ones(len(parents), past, dtype=torch.bool), tree], dim=1)
    positions = torch.tensor(node_depths(parents), dtype=torch.long) + past
    return mask.to(device), positions.to(device)


def greedy_path(tokens: list[int], parents: list[int], best: list[int]) -> tuple[list[int], int]:
    """The longest root path whose every step is the target's argmax; returns (node indices, next token).

    ``best[i]`` is the target's argmax after node i. The path starts at the
    root; it moves to a child whose token equals ``best`` of the current node.
    """
    children: dict[int, list[int]] = {}
    for index, parent in enumerate(parents[1:], start=1):
        children.setdefault(parent, []).append(index)
    path = [0]
    while True:
        current = path[-1]
        following = next((child for child in children.get(current, []) if tokens[child] == best[current]), None)
        if following is None:
            return path, best[current]
        path.append(following)
