"""The compiled path (``run.compile``): a static KV cache decodes exactly what the dynamic one does, crops by length,
grows when outgrown, keeps tree paths; the sweep setting is checked, keyed and falls back on the CPU with a notice.

CUDA graphs themselves need a GPU: the last test runs them where one is visible (never in CI, which has none);
``bench/efficiency.py`` checks them on a lent GPU against the eager path."""

from __future__ import annotations

import pytest
import torch

from harness.core.errors import ConfigError
from harness.core.lm import CausalLM
from harness.core.static_lm import SlotCache, StaticCausalLM, compiled
from strategies import ModelSet, Sampling, build

MAX_NEW = 24
STRATEGIES = [
    ("autoregressive", {}),
    ("speculative", {"draft": "draft-1l", "gamma": 2}),
    ("speculative", {"draft": "draft-2l", "gamma": 5}),
    ("prompt_lookup", {"num_tokens": 6}),
    ("lookahead", {}),
    ("suffix", {}),
]


def static_models(models: ModelSet, capacity: int) -> ModelSet:
    """``models`` with the target and every draft on the static path (no graphs), caches of ``capacity``."""
    return ModelSet(target=StaticCausalLM(models.target.model, "target", capacity=capacity, graphs=False),
                    drafts={name: StaticCausalLM(draft.model, name, capacity=capacity, graphs=False)
                            for name, draft in models.drafts.items()})


@pytest.fixture(scope="module")
def baseline_runs(zoo_models, zoo_prompts):
    """The dynamic-cache baseline's tokens on every zoo prompt."""
    models, _ = zoo_models
    baseline = build("autoregressive", {}, models)
    return [baseline.generate(prompt, MAX_NEW, Sampling()).tokens for prompt in zoo_prompts]


@pytest.mark.parametrize("name, params", STRATEGIES)
def test_the_static_path_decodes_the_dynamic_paths_tokens_in_the_same_steps(zoo_models, zoo_prompts, baseline_runs,
                                                                            name, params):
    models, _ = zoo_models
    dynamic = build(name, params, models)
    static = build(name, params, static_models(models, capacity=16))  # every prompt outgrows it: growth runs
    for prompt, expected in zip(zoo_prompts, baseline_runs):
        reference = dynamic.generate(prompt, MAX_NEW, Sampling())
        trace = static.generate(prompt, MAX_NEW, Sampling())
        assert trace.tokens == reference.tokens == expected
        assert [(s.drafted, s.accepted) for s in trace.steps] == [(s.drafted, s.accepted) for s in reference.steps]
        assert trace.forward["target"]["decode_calls"] == reference.forward["target"]["decode_calls"]


def test_crop_is_a_length_update_and_later_tokens_overwrite_the_stale_positions(zoo_models, zoo_prompts):
    models, _ = zoo_models
    static = StaticCausalLM(models.target.model, "static", capacity=64, graphs=False)
    dynamic = CausalLM(models.target.model, "dynamic")
    ids = zoo_prompts[0][:20]
    for lm in (static, dynamic):
        lm.prefill(ids)
        lm.extend([5, 17, 42, 99, 7])
        lm.crop(len(ids) + 2)
    keys_before = static.cache.layers[0].keys.clone()
    torch.testing.assert_close(static.extend([11, 12]).logits, dynamic.extend([11, 12]).logits)
    assert static.length == dynamic.length == len(ids) + 4
    assert torch.equal(static.cache.layers[0].keys[:, :, :len(ids) + 2], keys_before[:, :, :len(ids) + 2])
    assert not torch.equal(static.cache.layers[0].keys[:, :, len(ids) + 2], keys_before[:, :, len(ids) + 2])
    with pytest.raises(ValueError, match="cannot crop"):
        static.crop(static.length + 1)


def test_keep_compacts_a_tree_path_as_the_dynamic_cache_does(zoo_models, zoo_prompts):
    models, _ = zoo_models
    static = StaticCausalLM(models.target.model, "static", capacity=64, graphs=False)
    dynamic = CausalLM(models.target.model, "dynamic")
    ids = zoo_prompts[1][:12]
    past, tree = len(ids), [3, 4, 5, 6]
    mask = torch.ones(len(tree), past + len(tree), dtype=torch.bool)
    mask[:, past:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([past, past + 1, past + 1, past + 2])
    outputs = []
    for lm in (static, dynamic):
        lm.prefill(ids)
        outputs.append(lm.extend(tree, attention_mask=mask, position_ids=positions).logits)
        lm.keep(list(range(past)) + [past, past + 2, past + 3])
        outputs.append(lm.extend([9]).logits)
    torch.testing.assert_close(outputs[0], outputs[2])
    torch.testing.assert_close(outputs[1], outputs[3])
    assert static.length == dynamic.length == past + 4


def test_a_sequence_that_outgrows_the_cache_moves_to_a_larger_one_with_its_positions(zoo_models, zoo_prompts):
    models, _ = zoo_models
    static = StaticCausalLM(models.target.model, "static", capacity=8, graphs=False)
    dynamic = CausalLM(models.target.model, "dynamic")
    ids = zoo_prompts[2][:30]
    torch.testing.assert_close(static.prefill(ids[:6]).logits, dynamic.prefill(ids[:6]).logits)
    torch.testing.assert_close(static.extend(ids[6:]).logits, dynamic.extend(ids[6:]).logits)
    assert static.capacity == 32 and static.length == 30


def test_the_drift_probe_leaves_the_sequence_in_flight_as_it_was(zoo_models, zoo_prompts):
    models, _ = zoo_models
    static = StaticCausalLM(models.target.model, "static", capacity=64, graphs=False)
    ids = zoo_prompts[0][:16]
    static.prefill(ids)
    calls = static.stats.calls
    seconds = static.time_steps([1, 3], context=8, repeats=2)
    assert len(seconds) == 2 and all(value > 0 for value in seconds)
    assert static.length == len(ids) and static.stats.calls == calls
    expected = CausalLM(models.target.model, "dynamic")
    expected.prefill(ids)
    torch.testing.assert_close(static.extend([7]).logits, expected.extend([7]).logits)


def test_forward_counts_and_injected_clock_as_on_the_dynamic_path(zoo_models, zoo_prompts):
    models, _ = zoo_models
    ticks = iter(range(1000))
    static = StaticCausalLM(models.target.model, "static", capacity=64, graphs=False)
    static.clock = lambda: float(next(ticks))
    static.prefill(zoo_prompts[0][:8])
    static.extend([1])
    static.extend([2, 3])
    stats = static.reset_stats()
    assert (stats.prefill_calls, stats.decode_calls, stats.decode_tokens, stats.calls) == (1, 2, 3, 3)
    assert stats.decode_seconds == 2.0  # one tick per forward


def test_a_vocabulary_subset_draft_keeps_its_subset_on_the_static_path(zoo_models, zoo_prompts):
    models, _ = zoo_models
    subset = list(range(0, models.target.vocab_size, 3))
    cut = CausalLM(models.drafts["draft-1l"].model, "cut", vocab_subset=subset)
    static = compiled(cut)
    assert static.subset is not None and static.num_parameters == cut.num_parameters
    torch.testing.assert_close(static.prefill(zoo_prompts[0], all_logits=True).logits,
                               cut.prefill(zoo_prompts[0], all_logits=True).logits)
    torch.testing.assert_close(static.extend([4, 5]).logits, cut.extend([4, 5]).logits)


def test_slot_cache_writes_where_the_slots_say_and_reports_a_host_length():
    slots = torch.tensor([2, 3, 0, 0])
    cache = SlotCache(capacity=4, slots=slots)
    keys = torch.arange(2.0).reshape(1, 1, 2, 1)
    stored, _ = cache.update(keys, keys + 10, layer_idx=1)
    assert len(cache.layers) == 2 and not cache.layers[0].is_initialized
    assert stored[0, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    cache.length = 4
    cache.crop(-1)
    assert cache.get_seq_length() == 3
    cache.crop(2)
    assert cache.get_seq_length() == 2


def test_hf_greedy_on_transformers_static_cache_equals_the_baseline(zoo_models, zoo_prompts, baseline_runs):
    models, _ = zoo_models
    peer = build("hf_greedy", {"compile": True}, models)
    for prompt, expected in zip(zoo_prompts, baseline_runs):
        assert peer.generate(prompt, MAX_NEW, Sampling()).tokens == expected


def test_run_compile_is_a_boolean_named_in_one_line(tmp_path):
    from harness.driver.config import load_sweep
    from tests.conftest import write_sweep

    with pytest.raises(ConfigError) as error:
        load_sweep(write_sweep(tmp_path / "bad.yaml", run={"compile": "yes"}))
    assert "run.compile" in str(error.value) and "true or false" in str(error.value)


def test_compiled_cells_have_ids_of_their_own_and_eager_ids_are_kept(tmp_path):
    from harness.driver.config import load_sweep
    from tests.conftest import write_sweep

    base = {"max_new_tokens": 12, "warmup_prompts": 1, "workers": 1, "num_cpus": 2, "pairing": "shared"}
    eager = load_sweep(write_sweep(tmp_path / "eager.yaml", run=base)).cells(device_type="cpu")
    unset = load_sweep(write_sweep(tmp_path / "unset.yaml", run={**base, "compile": False})).cells(device_type="cpu")
    fast = load_sweep(write_sweep(tmp_path / "fast.yaml", run={**base, "compile": True})).cells(device_type="cpu")
    assert [cell.cell_id for cell in eager] == [cell.cell_id for cell in unset]
    assert not {cell.cell_id for cell in eager} & {cell.cell_id for cell in fast}
    assert all(cell.label.endswith(" compiled") for cell in fast)


def test_the_model_cache_puts_models_and_heads_on_the_static_path_when_compiling(tiny_zoo):
    from harness.core.models import ModelSpec
    from harness.driver.model_cache import ModelCache

    cache = ModelCache(tiny_zoo, "cpu", compile=True)
    assert isinstance(cache.model(ModelSpec("zoo:target"), "target"), StaticCausalLM)
    assert type(ModelCache(tiny_zoo, "cpu").model(ModelSpec("zoo:target"), "target")) is CausalLM


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_decode_what_eager_forwards_decode(zoo_models, zoo_prompts):
    models, _ = zoo_models
    device = torch.device("cuda")
    target_model, draft_model = models.target.model.to(device), models.drafts["draft-1l"].model.to(device)
    try:
        eager = ModelSet(target=CausalLM(target_model, "target"), drafts={"draft-1l": CausalLM(draft_model, "d")})
        target = StaticCausalLM(target_model, "target")
        graphed = ModelSet(target=target, drafts={"draft-1l": StaticCausalLM(draft_model, "draft-1l")})
        for name, params in STRATEGIES[:2] + STRATEGIES[3:4]:
            reference, strategy = build(name, params, eager), build(name, params, graphed)
            for prompt in zoo_prompts:
                expected = reference.generate(prompt, MAX_NEW, Sampling())
                trace = strategy.generate(prompt, MAX_NEW, Sampling())
                assert trace.tokens == expected.tokens
                assert [(s.drafted, s.accepted) for s in trace.steps] == [(s.drafted, s.accepted)
                                                                          for s in expected.steps]
        assert target.captures > 0 and target.graphs
    finally:
        models.target.model.to("cpu")
        models.drafts["draft-1l"].model.to("cpu")
