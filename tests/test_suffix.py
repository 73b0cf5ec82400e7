"""Suffix drafting (SuffixDecoding): the suffix trie against brute-force matching, lossless decoding, exact sampling."""

from __future__ import annotations

import random

import pytest
import torch

from strategies import Sampling, build
from strategies.suffix_trie import SuffixTrie
from tests.test_batching import check_greedy_rows_equal_batch_1, check_rows_stop_at_their_own_eos, ragged


def occurrences(text: list[int], pattern: list[int]) -> list[int]:
    """Start indices of every occurrence of ``pattern`` in ``text``."""
    return [start for start in range(len(text) - len(pattern) + 1) if text[start:start + len(pattern)] == pattern]


def random_text(rng: random.Random, length: int, alphabet: int) -> list[int]:
    return [rng.randrange(alphabet) for _ in range(length)]


@pytest.mark.parametrize("seed", range(6))
def test_trie_counts_equal_brute_force_occurrences(seed):
    rng = random.Random(seed)
    text = random_text(rng, 80, 3)
    trie = SuffixTrie(max_depth=5)
    position = 0
    while position < len(text):  # grown in uneven chunks, as steps commit them
        step = rng.randint(1, 6)
        trie.extend(text[position:position + step])
        position += step
    for _ in range(300):
        pattern = random_text(rng, rng.randint(1, 7), 3)
        expected = len(occurrences(text, pattern)) if len(pattern) <= 5 else 0
        assert trie.count(pattern) == expected, pattern


@pytest.mark.parametrize("seed", range(4))
def test_documents_count_only_the_substrings_inside_each_one(seed):
    """The global tree's outputs are documents of their own: no counted substring spans two."""
    rng = random.Random(50 + seed)
    documents = [random_text(rng, rng.randint(3, 25), 3) for _ in range(6)]
    trie = SuffixTrie(max_depth=5)
    for document in documents:
        trie.extend(document)
        trie.end_document()
    for _ in range(300):
        pattern = random_text(rng, rng.randint(1, 5), 3)
        assert trie.count(pattern) == sum(len(occurrences(document, pattern)) for document in documents), pattern


@pytest.mark.parametrize("seed", range(6))
def test_matches_are_the_suffixes_that_occurred_before_with_a_continuation(seed):
    rng = random.Random(100 + seed)
    text = random_text(rng, 60, 4)
    trie = SuffixTrie(max_depth=6)
    trie.extend(text)
    for _ in range(50):
        context = random_text(rng, 10, 4)
        expected = [length for length in range(1, 6)
                    if any(start + length < len(text) for start in occurrences(text, context[-length:]))]
        assert [length for length, _ in trie.matches(context, 5)] == expected


@pytest.mark.parametrize("seed", range(4))
def test_speculation_nodes_carry_brute_force_continuation_frequencies(seed):
    rng = random.Random(200 + seed)
    text = random_text(rng, 120, 3)
    trie = SuffixTrie(max_depth=8)
    trie.extend(text)
    pattern = text[-2:]
    node = trie.node(pattern)
    speculation = trie.speculate(node, len(pattern), max_tokens=6, min_token_prob=0.05)
    assert 1 <= len(speculation.tokens) <= 6
    for index, prob in enumerate(speculation.probs):
        path, walk = [], index
        while walk >= 0:
            path.insert(0, speculation.tokens[walk])
            walk = speculation.parents[walk]
        expected = 1.0
        for depth in range(len(path)):  # D: the product of continuation frequencies along the path
            longer, shorter = pattern + path[:depth + 1], pattern + path[:depth]
            expected *= len(occurrences(text, longer)) / len(occurrences(text, shorter))
        assert prob == pytest.approx(expected) and prob >= 0.05
    # best first: no first-level continuation left out beats the weakest node taken
    taken = {token for token, parent in zip(speculation.tokens, speculation.parents) if parent == -1}
    left_out = [len(occurrences(text, pattern + [token])) / len(occurrences(text, pattern))
                for token in range(3) if token not in taken]
    assert all(prob <= min(speculation.probs) + 1e-9 for prob in left_out)


SETTINGS = [{}, {"tree": False}, {"max_spec_factor": 2.0, "max_spec_tokens": 6, "min_token_prob": 0.0}]


@pytest.mark.parametrize("params", SETTINGS, ids=["tree", "chain", "wide"])
def test_greedy_suffix_drafting_equals_autoregressive(zoo_models, zoo_prompts, params):
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    strategy = build("suffix", params, models)
    drafted = 0
    for ids in zoo_prompts:
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == baseline.generate(ids, 40, Sampling()).tokens
        drafted += got.drafted
        assert all(step.drafted <= params.get("max_spec_tokens", 16) for step in got.steps)
    assert drafted > 0


def test_the_global_tree_drafts_from_earlier_outputs_and_stays_lossless(zoo_models, zoo_prompts):
    """Decoding the same prompts again, the global tree holds their outputs: fewer steps, the same tokens."""
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    local_only = build("suffix", {}, models)
    strategy = build("suffix", {"global_tree": True}, models)
    first = [strategy.generate(ids, 40, Sampling()) for ids in zoo_prompts]
    second = [strategy.generate(ids, 40, Sampling()) for ids in zoo_prompts]
    for ids, before, again in zip(zoo_prompts, first, second):
        wanted = baseline.generate(ids, 40, Sampling()).tokens
        assert before.tokens == again.tokens == wanted
    assert [trace.extras["suffix"]["global_tree_steps"] for trace in first][0] == 0  # nothing decoded before
    assert sum(trace.extras["suffix"]["global_tree_steps"] for trace in second) > 0
    assert sum(len(trace.steps) for trace in second) < sum(len(trace.steps) for trace in first)
    once, twice = ([len(local_only.generate(ids, 40, Sampling()).steps) for ids in zoo_prompts] for _ in range(2))
    assert once == twice  # without the global tree a strategy remembers nothing between requests


def test_batched_rows_share_the_global_tree_of_earlier_batches(zoo_models, zoo_prompts):
    """At B = 4 the rows read the tree as it was before their batch and join it after: a second batch of the same
    prompts takes fewer steps, and every row keeps the baseline's tokens."""
    from tests.test_batching import baseline_tokens

    models, _ = zoo_models
    prompts = ragged(zoo_prompts)
    strategy = build("suffix", {"global_tree": True}, models)
    first, second = (strategy.generate_batch(prompts, 30, Sampling()) for _ in range(2))
    expected = baseline_tokens(models, prompts)
    assert [row.tokens for row in first.rows] == [row.tokens for row in second.rows] == expected
    assert all(row.extras["suffix"]["global_tree_steps"] == 0 for row in first.rows)
    assert sum(len(row.steps) for row in second.rows) < sum(len(row.steps) for row in first.rows)


@pytest.mark.parametrize("params", SETTINGS[:2], ids=["tree", "chain"])
def test_suffix_rows_at_batch_4_equal_the_batch_1_baseline(zoo_models, zoo_prompts, params):
    models, _ = zoo_models
    check_greedy_rows_equal_batch_1(models, ragged(zoo_prompts), "suffix", params)
    check_rows_stop_at_their_own_eos(models, ragged(zoo_prompts), "suffix", params)


@pytest.mark.parametrize("params", [*SETTINGS[:2], {"global_tree": True}], ids=["tree", "chain", "global"])
def test_sampling_keeps_the_target_distribution(params):
    """The joint law of the first three sampled tokens equals the target's, alone and per row at B = 4."""
    from harness.core.lm import CausalLM
    from strategies import ModelSet
    from tests.test_batching import chi_square_p_value
    from tests.test_speculative import check_sampling_keeps_the_joint_law, exact_joint, tiny_llama

    vocab, length = 4, 3
    target = CausalLM(tiny_llama(1, vocab), "target")
    models = ModelSet(target=target)
    prompt = [0, 1, 3, 2, 1, 3, 0, 2, 2, 1]  # every token occurs with continuations: each run drafts
    strategy = build("suffix", {"max_spec_factor": 2.0, **params}, models)
    check_sampling_keeps_the_joint_law(strategy, target, prompt, runs=2000, seed=77)
    truth = exact_joint(target, prompt, vocab, length).flatten()
    generator = torch.Generator().manual_seed(78)
    batch_counts = torch.zeros((vocab,) * length)
    for _ in range(150):
        batch = strategy.generate_batch([prompt[:7], prompt, prompt[:7], prompt],
                                        length, Sampling(temperature=1.0, generator=generator))
        for row in (1, 3):
            batch_counts[tuple(batch.rows[row].tokens)] += 1
    assert chi_square_p_value(batch_counts.flatten(), truth) > 1e-3


def test_bad_suffix_params_are_one_line_errors(tmp_path, capsys):
    from harness.driver.cli import main
    from tests.conftest import write_sweep

    path = write_sweep(tmp_path / "sweep.yaml", strategies=[{"name": "suffix", "params": {"max_spec_factor": 0}}])
    assert main(["run", str(path), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strategies[0].max_spec_factor: must be > 0" in err, err
