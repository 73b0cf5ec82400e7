"""Lookahead decoding: the n-gram pool against brute force, the Jacobi branch's mask, lossless decoding, sampling."""

from __future__ import annotations

import random

import pytest
import torch

from strategies import Sampling, build
from strategies.methods.lookahead import (LookaheadProposal, LookaheadVerifier, NgramPool, candidate_tree,
                                         lookahead_forward)


def brute_force_pool(text: list[int], size: int, capacity: int) -> dict[int, list[tuple[int, ...]]]:
    """Per key, the distinct continuations of its ``size``-grams, by their latest occurrence, the last
    ``capacity`` of them."""
    latest: dict[int, dict[tuple[int, ...], int]] = {}
    for start in range(len(text) - size + 1):
        latest.setdefault(text[start], {})[tuple(text[start + 1:start + size])] = start
    return {key: sorted(found, key=found.get)[-capacity:] for key, found in latest.items()}


@pytest.mark.parametrize("seed", range(6))
def test_the_pool_keeps_the_latest_distinct_ngrams_per_key(seed):
    rng = random.Random(seed)
    text = [rng.randrange(3) for _ in range(70)]
    size, capacity = rng.choice([2, 3, 4]), rng.choice([1, 2, 5])
    pool = NgramPool(capacity)
    grown = 0
    while grown < len(text):  # added as steps commit tokens
        step = rng.randint(1, 5)
        pool.add_text(text[:grown + step], size, ending_after=grown)
        grown += step
    expected = brute_force_pool(text, size, capacity)
    for key in range(3):
        assert pool.candidates(key) == expected.get(key, [])


def test_candidates_merge_into_a_tree_cut_to_the_budget():
    tokens, parents = candidate_tree(9, [(1, 2, 3), (1, 2, 4), (5, 6, 7)], budget=2)
    assert tokens == [9, 1, 2, 5, 6] and parents == [-1, 0, 1, 0, 3]


@pytest.mark.parametrize("size,width", [(2, 3), (3, 4), (4, 2)])
def test_each_window_column_sees_its_own_trajectory_at_its_positions(zoo_models, zoo_prompts, size, width):
    """Each last-level window token's logits equal the target's after the text that token's column spells: level
    0's tokens up to the column, then the column's own levels, at consecutive positions, beside a candidate tree
    it must not see (this fails if a column saw another column's levels, the tree, or sat at another position)."""
    models, _ = zoo_models
    target = models.target
    prompt = zoo_prompts[0]
    generator = torch.Generator().manual_seed(size * 10 + width)
    window = torch.randint(0, 50, (size - 1, width), generator=generator).tolist()
    target.prefill(prompt[:-1])
    proposal = LookaheadProposal([prompt[-1], 7, 8, 9], parents=[-1, 0, 0, 1], window=window)
    proposal.window[0][0] = prompt[-1]
    out, last_level = lookahead_forward(target, len(prompt) - 1, proposal)
    for column in range(width):
        spelled = proposal.window[0][: column + 1] + [level[column] for level in proposal.window[1:]]
        alone = target.prefill(prompt[:-1] + spelled).logits[-1]
        torch.testing.assert_close(out.logits[last_level[column]], alone, rtol=1e-4, atol=1e-4)
    tree_alone = target.prefill(prompt + [7, 9]).logits[-1]  # the tree's node 3 (path 0-1-3) sees no window
    torch.testing.assert_close(out.logits[3], tree_alone, rtol=1e-4, atol=1e-4)


def test_a_window_on_the_greedy_trajectory_predicts_its_next_tokens(zoo_models, zoo_prompts):
    models, _ = zoo_models
    target, prompt, size, width = models.target, zoo_prompts[0], 3, 4
    greedy = build("autoregressive", {}, models).generate(prompt, width + size + 2, Sampling()).tokens
    target.prefill(prompt)
    window = [[greedy[level + column] for column in range(width)] for level in range(size - 1)]
    verification = LookaheadVerifier()(target, prompt + greedy[:1],
                                       LookaheadProposal([greedy[0]], parents=[-1], window=window), Sampling())
    assert verification.jacobi == [greedy[column + size - 1] for column in range(width)]
    assert verification.tokens == greedy[1:2]


SETTINGS = [{}, {"pool_from_prompt": True}, {"window_size": 3, "ngram_size": 2, "guesses": 2},
            {"window_size": 4, "ngram_size": 5, "guesses": 8, "pool_from_prompt": True}]


@pytest.mark.parametrize("params", SETTINGS, ids=["default", "prompt-pool", "small", "long"])
def test_greedy_lookahead_equals_autoregressive(zoo_models, zoo_prompts, params):
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    strategy = build("lookahead", params, models)
    accepted = 0
    for ids in zoo_prompts:
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == baseline.generate(ids, 40, Sampling()).tokens
        accepted += got.accepted
    assert accepted > 0  # guesses were verified and kept, not only plain target steps


def test_sampling_keeps_the_target_distribution():
    from harness.core.lm import CausalLM
    from strategies import ModelSet
    from tests.test_speculative import check_sampling_keeps_the_joint_law, tiny_llama

    target = CausalLM(tiny_llama(1, 4), "target")
    prompt = [0, 1, 3, 2, 1, 3, 0, 2, 2, 1, 0, 3]
    params = {"pool_from_prompt": True, "window_size": 2, "ngram_size": 3}
    check_sampling_keeps_the_joint_law(build("lookahead", params, ModelSet(target=target)), target, prompt, runs=2000,
                                       seed=5)


def test_lookahead_cannot_batch_and_says_so(tmp_path, capsys):
    from harness.driver.cli import main
    from tests.conftest import write_sweep

    path = write_sweep(tmp_path / "sweep.yaml", strategies=[{"name": "lookahead", "params": {"ngram_size": 1}}])
    assert main(["run", str(path), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strategies[0].ngram_size: must be >= 2" in err, err
    path = write_sweep(tmp_path / "sweep2.yaml", run={"batch_size": 2, "pairing": "interleaved"},
                       strategies=[{"name": "lookahead"}])
    assert main(["run", str(path), "--results-dir", str(tmp_path)]) == 2
    assert "lookahead decodes one prompt at a time" in capsys.readouterr().err
