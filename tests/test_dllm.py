"""D-LLM layer skipping: with every router executing it computes what the dense model does; a token skipped at a
layer is invisible to later tokens' attention at that layer; SpaDec's split pass keeps the caches aligned."""

from __future__ import annotations

import pytest
import torch

from harness.core.dllm import LayerRouters, SkippingLM, route_tokens
from harness.core.lm import CausalLM
from harness.core.tree import tree_inputs


def routers_for(model: torch.nn.Module, start: int = 1, skip_layers: tuple[int, ...] = ()) -> LayerRouters:
    """Routers from ``start`` on that execute everywhere except in ``skip_layers`` (where they always skip)."""
    config = model.config
    routers = LayerRouters(config.hidden_size, config.num_hidden_layers, start, rank=8)
    with torch.no_grad():
        for layer in range(start, config.num_hidden_layers):
            router = routers.routers[layer - start]
            router.up.weight.zero_()
            router.up.bias.copy_(torch.tensor([5.0, -5.0]) if layer in skip_layers else torch.tensor([-5.0, 5.0]))
    return routers


@pytest.fixture
def target_model(zoo_models):
    return zoo_models[0].target.model


def test_with_every_router_executing_it_equals_the_dense_model(target_model):
    dense = CausalLM(target_model, "dense")
    skipping = SkippingLM(target_model, "dllm", routers_for(target_model))
    prompt = [5, 17, 33, 8, 91, 12]
    for model in (dense, skipping):
        model.prefill(prompt, all_logits=True)
    assert torch.allclose(dense.extend([40, 41, 42]).logits, skipping.extend([40, 41, 42]).logits, atol=1e-5)
    parents = [-1, 0, 0, 1, 2]
    mask, positions = tree_inputs(parents, dense.length, dense.device)
    tree = [43, 50, 51, 60, 61]
    expected = dense.extend(tree, attention_mask=mask, position_ids=positions).logits
    got = skipping.extend(tree, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert skipping.skips.skipped == 0 and skipping.skips.routed > 0


def test_a_token_skipped_at_a_layer_is_invisible_there_to_later_tokens(target_model):
    layers = target_model.config.num_hidden_layers
    skipped_layer = layers - 1
    model = SkippingLM(target_model, "dllm", routers_for(target_model, skip_layers=(skipped_layer,)))
    model.prefill([5, 17, 33, 8])  # a multi-token pass skips the layer too (every token says skip)
    assert model.skips.skipped == 4 and model.skips.skipped_parameters == model.layer_parameters[skipped_layer]
    model.force_execute = True
    model.extend([40])
    assert model.flags[skipped_layer].tolist() == [False] * 4 + [True]

    def later_logits(corrupt: int) -> torch.Tensor:
        """The next token's logits after filling cached slot ``corrupt`` of the skipped layer with noise."""
        entry = model.cache.layers[skipped_layer]
        with torch.inference_mode():
            saved = entry.keys.clone(), entry.values.clone()
            entry.keys[..., corrupt, :] = 100.0
            entry.values[..., corrupt, :] = -100.0
        logits = model.extend([41]).logits[-1]
        model.crop(5)
        entry.keys, entry.values = saved
        return logits

    baseline = model.extend([41]).logits[-1]
    model.crop(5)
    assert torch.allclose(later_logits(corrupt=2), baseline, atol=1e-6)  # evicted slot: no effect
    assert not torch.allclose(later_logits(corrupt=4), baseline, atol=1e-3)  # an executed slot: it matters


def test_the_split_pass_of_the_whole_tree_equals_a_tree_pass_and_keeps_the_caches_aligned(target_model):
    dense = CausalLM(target_model, "dense")
    skipping = SkippingLM(target_model, "dllm", routers_for(target_model), force_execute=True)
    prompt = [5, 17, 33, 8, 91]
    for model in (dense, skipping):
        model.prefill(prompt[:-1])
    parents, tree = [-1, 0, 0, 1, 2, 3], [91, 50, 51, 60, 61, 70]
    mask, positions = tree_inputs(parents, dense.length, dense.device)
    expected = dense.extend(tree, attention_mask=mask, position_ids=positions).logits
    out, chosen, entering = skipping.forward_split(tree, mask, positions, split=1, select=lambda h: list(range(len(h))))
    assert chosen == list(range(6)) and entering.shape[0] == 6
    assert torch.allclose(out.logits, expected, atol=1e-5)
    # only a path through the deep layers: its logits equal the dense pass's on those nodes
    skipping.crop(len(prompt) - 1)
    path = [0, 1, 3, 5]
    out, chosen, _ = skipping.forward_split(tree, mask, positions, split=1, select=lambda h: path)
    assert torch.allclose(out.logits, expected[path], atol=1e-5)
    lengths = {int(entry.keys.shape[-2]) for entry in skipping.cache.layers}
    assert lengths == {len(prompt) - 1 + len(tree)}  # one slot per node in every layer
    deep = skipping.flags[-1][len(prompt) - 1:].tolist()
    assert deep == [node in path for node in range(len(tree))] and all(skipping.flags[0])
    skipping.keep(list(range(len(prompt) - 1)) + [len(prompt) - 1 + node for node in path])
    dense.keep(list(range(len(prompt) - 1)) + [len(prompt) - 1 + node for node in path])
    assert torch.allclose(dense.extend([80]).logits, skipping.extend([80]).logits, atol=1e-5)


def test_the_training_forward_mixes_by_decision_and_reports_the_activation_ratio(target_model):
    ids = torch.tensor([[5, 17, 33, 8, 91, 12, 40]])
    with torch.no_grad():
        dense = target_model(input_ids=ids).logits.float()
        logits, ratio = route_tokens(target_model, routers_for(target_model), ids)
        assert float(ratio) == 1.0 and torch.allclose(logits, dense, atol=1e-4)
        layers = target_model.config.num_hidden_layers
        logits, ratio = route_tokens(target_model, routers_for(target_model, skip_layers=tuple(range(1, layers))), ids)
    assert float(ratio) == 0.0
    body = target_model.get_decoder()
    with torch.no_grad():  # every routed layer skipped: only layer 0 ran
        hidden = body.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        hidden = body.layers[0](hidden, position_embeddings=body.rotary_emb(hidden, position_ids=positions),
                                position_ids=positions, attention_mask=None)
        shallow = target_model.get_output_embeddings()(body.norm(hidden)).float()
    assert torch.allclose(logits, shallow, atol=1e-4)


TINY_DLLM = {"kind": "dllm", "steps": 30, "batch_size": 4, "lr": 0.003, "warmup_steps": 3, "router_rank": 8,
             "data": {"samples": 96, "seq_len": 32}, "launch": {"num_workers": 1, "cpus_per_worker": 1}}


@pytest.fixture(scope="module")
def dllm_request(tiny_zoo):
    from pathlib import Path

    from training.artifacts import build_artifact, load_train_config

    request = load_train_config(TINY_DLLM, "train.dllm", Path("."), tiny_zoo)
    manifest = build_artifact(request, log=lambda message: None)
    return request, manifest


def test_dllm_training_moves_the_activation_ratio_to_its_target_and_loads_as_a_skipping_target(dllm_request,
                                                                                             zoo_models, zoo_prompts):
    from strategies import ModelSet, Sampling, build
    from training.artifacts import load_artifact

    request, manifest = dllm_request
    metrics = manifest["metrics"]
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert after["loss"] < before["loss"]
    assert abs(after["ratio"] - 0.5) < abs(before["ratio"] - 0.5)
    models, _ = zoo_models
    dllm = load_artifact(request, models.target)
    assert isinstance(dllm, SkippingLM)
    strategy = build("dllm", {"dllm": "dllm"}, ModelSet(target=models.target, artifacts={"dllm": dllm}))
    trace = strategy.generate(zoo_prompts[0], 12, Sampling())
    assert trace.new_tokens == 12 and trace.extras["lossy"]
    assert 0 <= trace.extras["skipped_layers"] <= trace.extras["routed_layers"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dllm_cell_is_lossy_its_mismatch_does_not_fail_it_and_the_report_says_so(dllm_request, tiny_zoo, tmp_path,
                                                                                 dtype):
    from harness.core.results import ResultStore
    from harness.driver.config import load_sweep
    from harness.driver.model_cache import ModelCache
    from harness.driver.report import write_report
    from harness.driver.runner import run_cell
    from tests.conftest import write_sweep

    models = {"target": "zoo:target", "drafts": {"small": "zoo:draft-1l"}, "device": "cpu", "dtype": dtype}
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml", train={"dllm": TINY_DLLM}, models=models,
                                   strategies=[{"name": "dllm", "params": {"dllm": "dllm"}}],
                                   run={"max_new_tokens": 16, "warmup_prompts": 0, "workers": 1, "num_cpus": 1}))
    (cell,) = sweep.cells()
    record = run_cell(cell, ModelCache(tiny_zoo, "cpu"))
    assert record.ok, record.error
    assert record.env.dtype == dtype
    assert all(turn.divergence is None for prompt in record.prompts for turn in prompt.turns)  # lossy: unclassified
    ResultStore(tmp_path / "run").append(record)
    (tmp_path / "run" / "sweep.yaml").write_text((tmp_path / "sweep.yaml").read_text())
    report = write_report(tmp_path / "run").read_text()
    assert "| dllm | lossy |" in report and "## Layer skipping (lossy)" in report
