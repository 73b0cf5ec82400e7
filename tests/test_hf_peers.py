"""transformers' own decoding as peers: greedy output equals the baseline's, counts add up, models are left as found."""

from __future__ import annotations

import pytest
import torch

from harness.core.errors import ConfigError
from harness.core.lm import CausalLM
from strategies import ModelSet, Sampling, build, parse_params, strategy_class
from strategies.methods.hf_peers import ForwardCall, generation_config_for, steps_from_calls, tokenizers_differ

MAX_NEW = 24
STATS_KEYS = {"calls", "prefill_calls", "prefill_seconds", "prefill_tokens", "decode_calls", "decode_seconds",
              "decode_tokens", "parameters"}

PEERS = [
    ("hf_greedy", {}),
    ("hf_assisted", {"draft": "draft-1l", "num_assistant_tokens": 2}),
    ("hf_assisted", {"draft": "draft-1l", "num_assistant_tokens": 6, "confidence_threshold": 0.0}),
    ("hf_assisted", {"draft": "draft-1l", "num_assistant_tokens": 3, "schedule": "heuristic"}),
    ("hf_prompt_lookup", {}),
]


@pytest.fixture(scope="module")
def baseline_tokens(zoo_models, zoo_prompts) -> list[list[int]]:
    """The autoregressive baseline's greedy tokens on every zoo prompt."""
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    return [baseline.generate(ids, MAX_NEW, Sampling()).tokens for ids in zoo_prompts]


def check_counts(trace) -> None:
    """The accounting every peer's trace must satisfy."""
    assert sum(step.accepted + 1 for step in trace.steps) == trace.new_tokens
    assert all(0 <= step.accepted <= step.drafted for step in trace.steps)
    assert trace.target_calls == len(trace.steps) > 0
    for stats in trace.forward.values():
        assert set(stats) == STATS_KEYS
        assert stats["calls"] == stats["prefill_calls"] + stats["decode_calls"]
        assert stats["prefill_calls"] == min(1, stats["calls"])
    assert trace.cost_units == sum(s["calls"] * s["parameters"] for s in trace.forward.values())


@pytest.mark.parametrize("name,params", PEERS)
def test_greedy_peers_equal_autoregressive(zoo_models, zoo_prompts, baseline_tokens, name, params):
    models, _ = zoo_models
    strategy = build(name, params, models)
    drafted = 0
    for ids, expected in zip(zoo_prompts, baseline_tokens):
        trace = strategy.generate(ids, MAX_NEW, Sampling())
        assert trace.tokens == expected
        check_counts(trace)
        drafted += trace.drafted
        if name == "hf_greedy":
            assert trace.drafted == 0 and trace.target_calls == trace.new_tokens
            assert set(trace.forward) == {"target"}
        if name == "hf_assisted":
            assert trace.forward["draft"]["calls"] > 0
            assert trace.forward["draft"]["parameters"] == models.draft(params["draft"]).num_parameters
    if name != "hf_greedy":
        assert drafted > 0


@pytest.mark.parametrize("name,params", PEERS[1:])
def test_max_new_tokens_is_respected(zoo_models, zoo_prompts, name, params):
    models, _ = zoo_models
    strategy = build(name, params, models)
    for limit in (1, 2, 5):
        trace = strategy.generate(zoo_prompts[2], limit, Sampling())
        assert trace.new_tokens <= limit
        check_counts(trace)


def test_heuristic_schedule_starts_every_prompt_afresh(zoo_models, zoo_prompts):
    """transformers keeps the adapted draft length on the assistant's config; every call starts from the params."""
    models, _ = zoo_models
    draft = models.draft("draft-2l").model
    own = draft.generation_config
    strategy = build("hf_assisted", {"draft": "draft-2l", "num_assistant_tokens": 2, "schedule": "heuristic",
                                     "confidence_threshold": 0.0}, models)
    first = strategy.generate(zoo_prompts[0], MAX_NEW, Sampling())
    second = strategy.generate(zoo_prompts[0], MAX_NEW, Sampling())
    assert [(s.drafted, s.accepted) for s in first.steps] == [(s.drafted, s.accepted) for s in second.steps]
    assert draft.generation_config is own


def test_checkpoint_generation_defaults_do_not_change_the_output(zoo_models, zoo_prompts, baseline_tokens):
    """A checkpoint's own generation config (penalties, n-gram bans) must not leak into the peers' decoding."""
    models, _ = zoo_models
    expected = baseline_tokens[0]
    assert len(set(expected)) < len(expected)  # a ban on repeated tokens would change this output
    config = models.target.model.generation_config
    saved = config.repetition_penalty, config.no_repeat_ngram_size
    config.repetition_penalty, config.no_repeat_ngram_size = 3.0, 1
    try:
        for name, params in (PEERS[0], PEERS[1], PEERS[4]):
            assert build(name, params, models).generate(zoo_prompts[0], MAX_NEW, Sampling()).tokens == expected
        assert models.target.model.generation_config is config
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = saved


@pytest.mark.parametrize("name,params", [PEERS[0], PEERS[1], PEERS[4]])
def test_sampling_is_reproducible(zoo_models, zoo_prompts, name, params):
    models, _ = zoo_models
    strategy = build(name, params, models)
    runs = [strategy.generate(zoo_prompts[1], 16, Sampling(temperature=0.8, generator=torch.Generator().manual_seed(3)))
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens
    assert 0 < runs[0].new_tokens <= 16
    check_counts(runs[0])


def test_hooks_and_configs_are_restored_on_error(zoo_models, zoo_prompts, monkeypatch):
    models, _ = zoo_models
    target, draft = models.target.model, models.draft("draft-1l").model
    configs = target.generation_config, draft.generation_config
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in (target, draft)]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(target, "generate", broken)
    with pytest.raises(RuntimeError, match="boom"):
        build("hf_assisted", {"draft": "draft-1l"}, models).generate(zoo_prompts[0], 8, Sampling())
    monkeypatch.undo()
    assert (target.generation_config, draft.generation_config) == configs
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in (target, draft)] == hooks


# ----------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("name,raw,field", [
    ("hf_assisted", {"draft": "d", "schedule": "bogus"}, "schedule"),
    ("hf_assisted", {"draft": "d", "num_assistant_tokens": 0}, "num_assistant_tokens"),
    ("hf_assisted", {"draft": "d", "confidence_threshold": 1.5}, "confidence_threshold"),
    ("hf_assisted", {}, "draft"),
    ("hf_prompt_lookup", {"num_tokens": 0}, "num_tokens"),
    ("hf_prompt_lookup", {"max_ngram": 0}, "max_ngram"),
    ("hf_greedy", {"gamma": 2}, "gamma"),
])
def test_bad_params_name_the_field(name, raw, field):
    with pytest.raises(ConfigError) as error:
        parse_params(name, raw, "strategies[0].params")
    assert error.value.field == f"strategies[0].params.{field}"


def test_generation_config_keeps_the_distribution(zoo_models):
    """transformers fills unset fields from its defaults (top_k 50): sampling switches the warpers off explicitly."""
    models, _ = zoo_models
    sampled = generation_config_for(models.target, 9, Sampling(temperature=0.7), 0)
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.top_p) == (True, 0.7, 0, 1.0)
    assert (sampled.max_new_tokens, sampled.min_new_tokens) == (9, 0)
    assert sampled.eos_token_id == sorted(models.target.eos_token_id)
    greedy = generation_config_for(models.target, 9, Sampling(), 0)
    assert greedy.do_sample is False and greedy.temperature is None


def test_params_defaults_and_drafts():
    params = parse_params("hf_assisted", {"draft": "small"}, "p")
    assert (params.num_assistant_tokens, params.schedule, params.confidence_threshold) == (20, "constant", 0.4)
    assert params.uses_drafts() == ["small"]
    lookup = parse_params("hf_prompt_lookup", {}, "p")
    assert (lookup.num_tokens, lookup.max_ngram) == (10, 2)
    assert ModelSet(target=None).draft_tokenizers == {}


def test_step_accounting_without_cache_positions():
    """Without cached lengths the accepted counts still add up to the new tokens, within [0, drafted]."""
    calls = [ForwardCall(length=7, start=None, seconds=0.0), ForwardCall(length=4, start=None, seconds=0.0),
             ForwardCall(length=4, start=None, seconds=0.0)]
    steps = steps_from_calls(calls, prompt_length=5, new_tokens=6)
    assert [s.drafted for s in steps] == [2, 3, 3]
    assert sum(s.accepted + 1 for s in steps) == 6
    assert all(0 <= s.accepted <= s.drafted for s in steps)


# ----------------------------------------------------------------------------- other tokenizers

@pytest.fixture(scope="module")
def other_tokenizer_draft(zoo_models, zoo_prompts):
    """A random tiny draft with its own, smaller BPE tokenizer trained on the zoo prompts' text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = zoo_models
    texts = [tokenizer.decode(ids) for ids in zoo_prompts] * 4
    draft_tokenizer = tokenizer.train_new_from_iterator(texts, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(draft_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=draft_tokenizer.bos_token_id, eos_token_id=draft_tokenizer.eos_token_id,
                         pad_token_id=draft_tokenizer.pad_token_id)
    return CausalLM(LlamaForCausalLM(config).eval(), "other"), draft_tokenizer


def test_only_hf_assisted_takes_drafts_with_other_tokenizers():
    assert getattr(strategy_class("hf_assisted"), "supports_other_tokenizers", False) is True
    for name in ("speculative", "hf_greedy", "hf_prompt_lookup"):
        assert getattr(strategy_class(name), "supports_other_tokenizers", False) is False


def test_universal_assisted_decoding_equals_autoregressive(zoo_models, zoo_prompts, baseline_tokens,
                                                           other_tokenizer_draft):
    models, tokenizer = zoo_models
    other, draft_tokenizer = other_tokenizer_draft
    assert other.vocab_size != models.target.vocab_size
    assert tokenizers_differ(tokenizer, draft_tokenizer) and not tokenizers_differ(tokenizer, tokenizer)
    mixed = ModelSet(target=models.target, drafts={"other": other}, tokenizer=tokenizer,
                     draft_tokenizers={"other": draft_tokenizer})
    strategy = build("hf_assisted", {"draft": "other", "num_assistant_tokens": 3, "confidence_threshold": 0.0}, mixed)
    assert strategy.universal_tokenizers() == (tokenizer, draft_tokenizer)
    for ids, expected in list(zip(zoo_prompts, baseline_tokens))[:3]:
        trace = strategy.generate(ids, MAX_NEW, Sampling())
        assert trace.tokens == expected
        check_counts(trace)
        assert trace.drafted > 0 and trace.forward["draft"]["calls"] > 0


def test_universal_speculative_sampling_leaves_the_draft_intact(zoo_models, zoo_prompts, other_tokenizer_draft):
    """transformers prunes the assistant's LM head in place when sampling across tokenizers: only a copy's."""
    models, tokenizer = zoo_models
    other, draft_tokenizer = other_tokenizer_draft
    head, embeddings = other.model.get_output_embeddings(), other.model.get_input_embeddings()
    mixed = ModelSet(target=models.target, drafts={"other": other}, tokenizer=tokenizer,
                     draft_tokenizers={"other": draft_tokenizer})
    strategy = build("hf_assisted", {"draft": "other", "num_assistant_tokens": 3}, mixed)
    runs = [strategy.generate(zoo_prompts[0], 12, Sampling(temperature=1.0, generator=torch.Generator().manual_seed(5)))
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and 0 < runs[0].new_tokens <= 12
    check_counts(runs[0])
    assert other.model.get_output_embeddings() is head and other.model.get_input_embeddings() is embeddings


def test_same_size_vocabularies_with_other_tokens_are_refused(zoo_models, zoo_prompts, other_tokenizer_draft):
    """transformers only runs universal assisted decoding between vocabularies of different sizes."""
    models, tokenizer = zoo_models
    _, draft_tokenizer = other_tokenizer_draft
    mixed = ModelSet(target=models.target, drafts=models.drafts, tokenizer=tokenizer,
                     draft_tokenizers={"draft-1l": draft_tokenizer})
    with pytest.raises(RuntimeError, match="same size"):
        build("hf_assisted", {"draft": "draft-1l"}, mixed).generate(zoo_prompts[0], 4, Sampling())
