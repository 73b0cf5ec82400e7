"""The synthetic-acceptance oracle: lossless, its measured per-position acceptance is the one set, batched too, and
it stays out of the leaderboard."""

from __future__ import annotations

import math

import pytest

from harness.core.metrics import position_acceptance
from strategies import Sampling, build
from tests.test_batching import baseline_tokens, ragged


def run(strategy, prompt: list[int], limit: int, seed: int = 0):
    """``generate`` after the untimed ``prepare`` (as the runner's ``timed_generate`` calls them)."""
    import torch

    strategy.prepare([prompt], limit)
    return strategy.generate(prompt, limit, Sampling(generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("acceptance", [0.0, 0.6, 1.0])
def test_the_oracle_is_lossless_and_accepts_all_or_nothing_at_the_extremes(zoo_models, zoo_prompts, acceptance):
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    oracle = build("oracle", {"gamma": 3, "acceptance": acceptance}, models)
    for prompt in zoo_prompts[:3]:
        expected = baseline.generate(prompt, 30, Sampling())
        trace = run(oracle, prompt, 30)
        assert trace.tokens == expected.tokens
        assert trace.target_calls == len(trace.steps) + 1  # prepare's passes are not counted
        if acceptance == 1.0:
            assert trace.accepted == trace.drafted and len(trace.steps) == math.ceil(trace.new_tokens / 4)
        if acceptance == 0.0:
            assert trace.accepted == 0 and len(trace.steps) == trace.new_tokens


def test_the_measured_acceptance_by_position_is_the_one_set(zoo_models, zoo_prompts):
    models, _ = zoo_models
    oracle = build("oracle", {"gamma": 3, "acceptance_by_position": [0.9, 0.5, 0.2]}, models)
    steps = []
    for seed, prompt in enumerate(zoo_prompts * 4):
        steps += [[step.drafted, step.accepted] for step in run(oracle, prompt, 40, seed).steps]
    measured = position_acceptance(steps, positions=3)
    for position, (rate, expected) in enumerate(zip(measured, (0.9, 0.5, 0.2))):
        reached = sum(1 for drafted, accepted in steps if drafted > position and accepted >= position)
        error = math.sqrt(expected * (1 - expected) / reached)
        assert abs(rate - expected) < 4 * error, (position, rate, reached)


def test_the_oracle_batches_losslessly(zoo_models, zoo_prompts):
    models, _ = zoo_models
    prompts = ragged(zoo_prompts)
    oracle = build("oracle", {"gamma": 4, "acceptance": 0.7}, models)
    oracle.prepare(prompts, 25)
    batch = oracle.generate_batch(prompts, 25, Sampling())
    assert [row.tokens for row in batch.rows] == baseline_tokens(models, prompts, 25)
    assert 0 < sum(row.accepted for row in batch.rows) < sum(row.drafted for row in batch.rows)


def test_the_oracle_refuses_sampling_and_bad_probabilities():
    from harness.core.errors import ConfigError
    from strategies import parse_params

    with pytest.raises(ConfigError, match=r"oracle.acceptance: must be a probability in \[0, 1\], got 1.5"):
        parse_params("oracle", {"acceptance": 1.5}, "oracle")
    with pytest.raises(ConfigError, match="runs greedy only"):
        parse_params("oracle", {}, "oracle").check_sampling(0.7, "strategies[0]")
