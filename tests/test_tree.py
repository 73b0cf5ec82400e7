"""Tree verification: masks and positions of a hand-made tree, per-node logits, KV compaction to the accepted path."""

from __future__ import annotations

import pytest
import torch

from harness.core.tree import ancestor_mask, greedy_path, node_depths, tree_inputs

#        0
#      /   \
#     1     2
#    / \     \
#   3   4     5
PARENTS = [-1, 0, 0, 1, 1, 2]


def test_mask_and_positions_of_a_hand_made_tree():
    assert node_depths(PARENTS) == [0, 1, 1, 2, 2, 2]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(ancestor_mask(PARENTS), expected)
    mask, positions = tree_inputs(PARENTS, past=7)
    assert mask.shape == (6, 13) and bool(mask[:, :7].all())
    assert torch.equal(mask[:, 7:], expected)
    assert positions.tolist() == [7, 8, 8, 9, 9, 9]


def test_parents_must_precede_children():
    with pytest.raises(ValueError, match="parents must come before"):
        node_depths([-1, 2, 0])


def test_greedy_path_follows_argmax_children():
    tokens = [10, 11, 12, 13, 14, 15]
    best = [12, 99, 15, 0, 0, 42]  # root -> 12 (node 2) -> 15 (node 5) -> 42 (not in tree)
    assert greedy_path(tokens, PARENTS, best) == ([0, 2, 5], 42)
    assert greedy_path(tokens, PARENTS, [77, 0, 0, 0, 0, 0]) == ([0], 77)


def test_tree_pass_matches_sequential_paths_and_compaction_keeps_the_path(zoo_models, zoo_prompts):
    models, _ = zoo_models
    target = models.target
    prompt = zoo_prompts[0][:24]
    context, root = prompt[:-1], prompt[-1]
    tokens = [root, 5, 9, 17, 33, 48]
    target.prefill(context)
    past = target.length
    mask, positions = tree_inputs(PARENTS, past)
    tree_logits = target.extend(tokens, attention_mask=mask, position_ids=positions).logits
    # every node's logits equal a plain forward over the prompt plus its root path
    for node in range(len(PARENTS)):
        path, current = [], node
        while current >= 0:
            path.insert(0, tokens[current])
            current = PARENTS[current]
        fresh = target.prefill(context + path).logits[-1]
        torch.testing.assert_close(tree_logits[node], fresh, rtol=1e-4, atol=1e-4)
    # compaction: keep the path 0 -> 2 -> 5, then continuing equals a fresh forward over that path
    target.prefill(context)
    target.extend(tokens, attention_mask=mask, position_ids=positions)
    target.keep(list(range(past)) + [past + 0, past + 2, past + 5])
    assert target.length == past + 3
    continued = target.extend([7]).logits[-1]
    fresh = target.prefill(context + [root, 9, 48, 7]).logits[-1]
    torch.testing.assert_close(continued, fresh, rtol=1e-4, atol=1e-4)
