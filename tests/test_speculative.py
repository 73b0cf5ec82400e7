"""Speculative decoding is lossless: greedy output equals the baseline's, sampling keeps the target's distribution."""

from __future__ import annotations

import itertools

import pytest
import torch

from harness.core.lm import CausalLM
from strategies import ModelSet, Sampling, build
from strategies.draft_length import AcceptanceEstimate, CostModelLength, best_draft_length, expected_tokens
from strategies.engine import decode
from strategies.methods.speculative import DraftModelProposer, SpeculativeParams
from strategies.verification import accept_chain as verify
from tests.conftest import assert_stopped_in_the_last_step, check_stops_at_the_first_eos

DECODERS = [("autoregressive", {}), ("speculative", {"draft": "draft-2l", "gamma": 4}),
            ("prompt_lookup", {"num_tokens": 4, "max_ngram": 2}),
            ("cascade", {"drafts": ["draft-2l", "draft-1l"], "k_matrix": [[2, 2], [0, 2]]})]


@pytest.mark.parametrize("draft", ["draft-1l", "draft-2l"])
@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_greedy_speculative_equals_autoregressive(zoo_models, zoo_prompts, draft, gamma):
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    strategy = build("speculative", {"draft": draft, "gamma": gamma}, models)
    for ids in zoo_prompts:
        expected = baseline.generate(ids, 40, Sampling())
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == expected.tokens
        assert got.target_calls <= expected.target_calls
        assert got.drafted >= got.accepted


def test_trace_counts_are_consistent(zoo_models, zoo_prompts):
    models, _ = zoo_models
    trace = build("speculative", {"draft": "draft-1l", "gamma": 3}, models).generate(zoo_prompts[0], 30, Sampling())
    # one target forward per verification step, plus the prefill
    assert trace.target_calls == len(trace.steps) + 1
    assert trace.new_tokens == len(trace.steps) + trace.accepted
    assert trace.cost_units == sum(s["calls"] * s["parameters"] for s in trace.forward.values())
    baseline = build("autoregressive", {}, models).generate(zoo_prompts[0], 30, Sampling())
    assert baseline.tau == 1.0 and baseline.alpha is None and baseline.target_calls == baseline.new_tokens


@pytest.mark.parametrize("name,params", DECODERS)
def test_max_new_tokens_is_respected(zoo_models, zoo_prompts, name, params):
    models, _ = zoo_models
    for limit in (1, 2, 5, 11):
        trace = build(name, params, models).generate(zoo_prompts[2], limit, Sampling())
        # no step drafts past the budget: the steps' spans add up to exactly the tokens kept
        assert sum(step.accepted + 1 for step in trace.steps) == trace.new_tokens == limit
        assert_stopped_in_the_last_step(trace, limit, models.target.eos_token_id)


@pytest.mark.parametrize("name,params", DECODERS)
def test_decoding_stops_at_the_first_eos(zoo_models, zoo_prompts, name, params):
    models, _ = zoo_models
    check_stops_at_the_first_eos(models, zoo_prompts, name, params)


# ----------------------------------------------------------------------------- sampling

def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_verify_rule_recovers_target_distribution():
    """One position, exact p and q: accepted-or-resampled tokens follow p, not q (a wrong rule fails)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=generator) * 2, 0)
    q = torch.softmax(torch.randn(6, generator=generator) * 2, 0)
    sampling = Sampling(temperature=1.0, generator=generator)
    counts = torch.zeros(6)
    draws = 20000
    for _ in range(draws):
        drafted = sampling.draw(q)
        accepted, correction = verify(torch.stack([p, p]), q[None], [drafted], sampling)
        counts[drafted if accepted else correction] += 1
    empirical = counts / draws
    assert total_variation(empirical, p) < 0.015
    assert total_variation(q, p) > 0.1  # the test can tell the draft's distribution from the target's


def tiny_llama(seed: int, vocab: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked, distinct distributions
    return model.eval()


def exact_joint(model: CausalLM, prompt: list[int], vocab: int, length: int) -> torch.Tensor:
    """P(t1..t_length | prompt) under ``model``, by enumerating every sequence."""
    joint = torch.zeros((vocab,) * length)
    for tokens in itertools.product(range(vocab), repeat=length):
        probability = 1.0
        for position in range(length):
            logits = model.prefill(prompt + list(tokens[:position])).logits[-1]
            probability *= float(torch.softmax(logits, -1)[tokens[position]])
        joint[tokens] = probability
    return joint


def check_sampling_keeps_the_joint_law(strategy, target: CausalLM, prompt: list[int], runs: int, seed: int,
                                       vocab: int = 4, length: int = 3) -> None:
    """``runs`` sampled continuations of ``prompt`` by ``strategy`` follow the target's joint law of their first
    ``length`` tokens (total variation < 0.06), and every run verified drafted tokens, not only plain target steps."""
    truth = exact_joint(target, prompt, vocab, length).flatten()
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros((vocab,) * length)
    drafted = 0
    for _ in range(runs):
        trace = strategy.generate(prompt, length, Sampling(temperature=1.0, generator=generator))
        counts[tuple(trace.tokens)] += 1
        drafted += trace.drafted
    assert drafted >= runs
    distance = total_variation(counts.flatten() / runs, truth)
    assert distance < 0.06, f"sampled joint distribution is {distance:.3f} (TV) away from the target's"


def test_sampling_speculative_keeps_target_distribution():
    """End to end with caches: the joint law of the first three sampled tokens equals the target's.

    With gamma 2 and three tokens this covers acceptance and residual resampling at
    both drafted positions, the bonus token, and a second round after a rejection.
    """
    vocab, length = 4, 3
    target = CausalLM(tiny_llama(1, vocab), "target")
    draft = CausalLM(tiny_llama(2, vocab), "draft")
    models = ModelSet(target=target, drafts={"d": draft})
    prompt = [1, 3, 2]
    truth = exact_joint(target, prompt, vocab, length).flatten()
    draft_joint = exact_joint(draft, prompt, vocab, length).flatten()
    strategy = build("speculative", {"draft": "d", "gamma": 2}, models)
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros((vocab,) * length)
    runs = 3000
    for _ in range(runs):
        tokens = strategy.generate(prompt, length, Sampling(temperature=1.0, generator=generator)).tokens
        counts[tuple(tokens)] += 1
    distance = total_variation(counts.flatten() / runs, truth)
    assert distance < 0.06, f"sampled joint distribution is {distance:.3f} (TV) away from the target's"
    assert total_variation(draft_joint, truth) > 0.2  # a rule that returned draft tokens would fail


def random_head(target: CausalLM, seed: int) -> CausalLM:
    """An untrained EAGLE head over ``target``: its drafts are arbitrary, which the sampling rule must absorb."""
    from strategies.eagle_head import EagleHead, head_config

    torch.manual_seed(seed)
    model = target.model
    head = EagleHead(head_config(model.config), model.get_input_embeddings(), model.get_output_embeddings())
    return CausalLM(head.eval(), "head", num_parameters=1)


@pytest.mark.parametrize("name,params", [
    ("prompt_lookup", {"num_tokens": 2, "max_ngram": 2}),
    ("eagle", {"head": "head", "gamma": 2}),
    ("eagle2", {"head": "head", "total_tokens": 4, "depth": 2, "top_k": 2}),
])
def test_sampling_keeps_target_distribution_end_to_end(name, params):
    """The joint law of the first three sampled tokens equals the target's for prompt lookup (deterministic
    drafts), EAGLE (head drafts) and EAGLE-2 (deterministic top-k trees), through the shared loop and caches."""
    vocab, length = 4, 3
    target = CausalLM(tiny_llama(1, vocab), "target")
    models = ModelSet(target=target, artifacts={"head": random_head(target, 5)})
    prompt = [1, 3, 2, 1, 3]  # the suffix [1, 3] occurs earlier: prompt lookup drafts [2, 1]
    check_sampling_keeps_the_joint_law(build(name, params, models), target, prompt, runs=3000, seed=4321, vocab=vocab,
                                       length=length)


def test_adaptive_schedule_is_lossless_and_drafts_at_most_gamma(zoo_models, zoo_prompts):
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    strategy = build("speculative", {"draft": "draft-2l", "gamma": 5, "schedule": "adaptive"}, models)
    for ids in zoo_prompts:
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == baseline.generate(ids, 40, Sampling()).tokens
        assert all(step.drafted <= 5 for step in got.steps)
    costs = got.extras["draft_length"]["verify_costs_s"]
    assert len(costs) == 6 and all(cost > 0 for cost in costs)


@pytest.mark.parametrize("draft_cost,verify_costs,drafts", [
    (10.0, [1.0, 2.0, 3.0], False),  # drafting can never pay: plain target steps only
    (0.0, [1.0] * 4, True),          # free drafts, flat verification: always the longest draft
])
def test_the_adaptive_length_decides_every_step(zoo_models, zoo_prompts, draft_cost, verify_costs, drafts):
    models, _ = zoo_models
    target, draft = models.target, models.draft("draft-2l")
    length = CostModelLength(max_gamma=len(verify_costs) - 1, draft_cost=draft_cost, verify_costs=verify_costs)
    target.reset()
    tokens, steps = decode(target, DraftModelProposer(draft, length), zoo_prompts[1], 30, Sampling())
    assert tokens == build("autoregressive", {}, models).generate(zoo_prompts[1], 30, Sampling()).tokens
    budgets = [min(len(verify_costs) - 1, 30 - 1 - sum(s.accepted + 1 for s in steps[:i])) for i in range(len(steps))]
    assert [step.drafted for step in steps] == (budgets if drafts else [0] * len(steps))


@pytest.mark.parametrize("alpha,draft_cost,verify_costs,best", [
    (0.5, 0.1, [1.0, 1.0, 1.0, 1.0, 1.0], 2),   # rates 1, 1.36, 1.46, 1.44, 1.35 (flat verification, as on a GPU)
    (0.5, 0.1, [1.0, 1.2, 1.4, 1.6, 1.8], 1),   # rates 1, 1.15, 1.09, ... (verification cost grows, as on a CPU)
    (0.05, 0.07, [1.0, 1.2, 1.4, 1.63], 0),     # SmolLM2's distilled draft on 2 CPU cores: do not draft
    (0.95, 0.05, [1.0, 1.0, 1.0, 1.0], 3),
    (0.5, 0.05, [1.0, 1.7, 2.5, 1.7], 3),       # a width-4 forward cheaper than width 3 (as measured on 2 cores)
])
def test_best_draft_length_maximises_tokens_per_unit_time(alpha, draft_cost, verify_costs, best):
    assert best_draft_length(alpha, draft_cost, verify_costs) == best


def test_acceptance_trials_follow_the_geometric_model():
    estimate = AcceptanceEstimate()
    estimate.add(drafted=3, accepted=1)   # kept one, the second was rejected: 2 trials
    estimate.add(drafted=3, accepted=3)   # all kept: 3 trials
    estimate.add(drafted=0, accepted=0)   # a plain target step tried nothing
    assert (estimate.accepted, estimate.trials) == (4, 5)
    assert 4 / 5 < estimate.optimistic() <= 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4.0


def test_a_constant_schedule_keeps_the_cell_id_of_cells_recorded_before_schedules():
    assert SpeculativeParams.from_dict({"draft": "d", "gamma": 3}, "p").as_dict() == {"draft": "d", "gamma": 3}
    assert SpeculativeParams.from_dict({"draft": "d", "schedule": "adaptive"}, "p").as_dict()["schedule"] == "adaptive"
