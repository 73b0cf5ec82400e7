"""EAGLE-3: fused target features, the reference layout by round trip, training-time test matching inference,
training through the trainer skeleton, and lossless greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

from harness.core.errors import ConfigError
from strategies import Sampling, build
from strategies.eagle3_head import (Eagle3Head, eagle3_config, feature_layers, head_feature_layers, load_eagle3,
                                    save_eagle3)

REFERENCE_KEYS = {"fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
                  "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
                  "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
                  "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
                  "midlayer.post_attention_layernorm.weight", "norm.weight", "lm_head.weight"}

TINY_EAGLE3 = {
    "kind": "eagle3",
    "target": "zoo:target",
    "data": {"sources": ["zoo:code", "zoo:prose"], "samples": 96, "seq_len": 32, "shards": 2, "batch_size": 16},
    "ttt_steps": 3,
    "steps": 40,
    "batch_size": 8,
    "lr": 0.003,
    "warmup_steps": 4,
    "launch": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 1, "checkpoint_every": 15},  # saves at 15, 30
}


def random_head(target_model, draft_ids=None, seed: int = 0, layer_ids: tuple[int, ...] = ()) -> Eagle3Head:
    torch.manual_seed(seed)
    config = eagle3_config(target_model.config, len(draft_ids or []), layer_ids=layer_ids)
    head = Eagle3Head(config, target_model.get_input_embeddings(), draft_ids)
    with torch.no_grad():
        for name, parameter in head.named_parameters():
            if not name.startswith("embed_tokens."):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return head.eval()


def test_feature_layers_are_the_states_entering_layers_2_half_and_l_minus_3():
    assert feature_layers(32) == (2, 16, 29) and feature_layers(12) == (2, 6, 9)


def test_a_forward_returns_named_layers_concatenated(zoo_models, zoo_prompts):
    models, _ = zoo_models
    target = models.target
    layers = feature_layers(int(target.model.config.num_hidden_layers))
    out = target.prefill(zoo_prompts[0], output_hidden_states=layers)
    with torch.no_grad():
        states = target.model(input_ids=torch.tensor([zoo_prompts[0]]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.hidden_states, torch.cat([states[i][0] for i in layers], -1))


@pytest.mark.parametrize("cut", [False, True], ids=["full-vocab", "draft-vocab"])
def test_the_reference_layout_round_trips(zoo_models, tmp_path, cut):
    models, _ = zoo_models
    target = models.target.model
    draft_ids = list(range(0, int(target.config.vocab_size), 3)) if cut else None
    head = random_head(target, draft_ids)
    save_eagle3(head, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == REFERENCE_KEYS | ({"d2t", "t2d"} if cut else set())
    if cut:  # target id = draft id + d2t, and t2d marks the draft vocabulary
        assert (saved["d2t"] + torch.arange(len(saved["d2t"]))).tolist() == draft_ids
        assert saved["t2d"].nonzero().flatten().tolist() == draft_ids
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    loaded = load_eagle3(tmp_path, target)
    ids, features = torch.tensor([[5, 6, 7]]), torch.randn(1, 3, 3 * target.config.hidden_size)
    torch.testing.assert_close(loaded(ids, features).logits, head(ids, features).logits)


def test_a_published_checkpoint_without_rope_settings_loads_with_the_default_base(zoo_models, tmp_path):
    models, _ = zoo_models
    target = models.target.model
    head = random_head(target)
    torch.save({name: tensor.clone() for name, tensor in head.head_state().items()}, tmp_path / "pytorch_model.bin")
    config = {key: value for key, value in head.config.to_dict().items()
              if key not in ("rope_theta", "rope_parameters", "rope_scaling")}
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLMEagle3"]}))
    loaded = load_eagle3(tmp_path, target)
    assert loaded.rotary.inv_freq[1].item() == pytest.approx(10000.0 ** (-2 / loaded.midlayer.self_attn.head_dim))
    state = loaded.head_state()
    assert all(torch.equal(state[name], tensor) for name, tensor in head.head_state().items())


def test_a_head_naming_its_layers_is_fed_those_layers_and_stays_lossless(zoo_models, zoo_prompts, tmp_path):
    """A head whose config names its fused layers (vLLM's ``eagle_aux_hidden_state_layer_ids``) keeps them through
    a save and load, and drafting hands it exactly those layers: its first drafted token is the one its own
    forward over those layers' states ranks first (fails if the target's default layers were fed instead)."""
    models, _ = zoo_models
    target = models.target.model
    layers = int(target.config.num_hidden_layers)
    named = (0, 1, layers - 1)
    assert named != feature_layers(layers)
    save_eagle3(random_head(target, seed=7, layer_ids=named), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == list(named)
    loaded = load_eagle3(tmp_path, target)
    assert head_feature_layers(loaded.config, layers) == named
    strategy = build("eagle3", {"head_dir": str(tmp_path), "depth": 1, "top_k": 1, "total_tokens": 2}, models)
    baseline = build("autoregressive", {}, models)
    prompt = zoo_prompts[0]
    with torch.no_grad():
        states = target(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        first = int(target(torch.tensor([prompt])).logits[0, -1].argmax())
        fused = torch.cat([states[index] for index in named], -1)
        wanted = int(loaded(torch.tensor([prompt[1:] + [first]]), fused).logits[0, -1].argmax())
    proposer = strategy.proposer()
    assert proposer.needs_hidden_states == named
    proposer.begin(prompt, models.target.prefill(prompt, output_hidden_states=named), prompt + [first])
    assert proposer.propose(prompt + [first], 4, Sampling()).tokens[1:] == [wanted]
    assert strategy.generate(prompt, 24, Sampling()).tokens == baseline.generate(prompt, 24, Sampling()).tokens


def test_a_head_naming_layers_its_target_lacks_is_refused(zoo_models, tmp_path):
    models, _ = zoo_models
    target = models.target.model
    layers = int(target.config.num_hidden_layers)
    save_eagle3(random_head(target, layer_ids=(1, 2, layers + 5)), tmp_path)
    with pytest.raises(ValueError, match=f"eagle_aux_hidden_state_layer_ids: the target has {layers} layers"):
        load_eagle3(tmp_path, target)


@pytest.mark.parametrize("ids, message", [([2, 6], "expected three layer indices"),
                                          ([6, 2, 11], "expected increasing indices"),
                                          ([2, 6, True], "expected three layer indices")])
def test_training_feature_layers_are_checked_before_any_model_loads(ids, message):
    from pathlib import Path

    from training.eagle3 import parse_eagle3_config

    raw = {key: value for key, value in TINY_EAGLE3.items() if key != "kind"}
    with pytest.raises(ConfigError, match=f"^train.feature_layers: {message}.*leave it out for 2, L // 2, L - 3"):
        parse_eagle3_config({**raw, "feature_layers": ids}, "train", Path("."), ("target",))
    assert "feature_layers" not in parse_eagle3_config(raw, "train", Path("."), ("target",)).identity()


def test_training_feature_layers_beyond_the_target_name_the_field():
    from training.eagle3 import Eagle3TrainConfig, fused_layers

    assert fused_layers(Eagle3TrainConfig(), 12, "train.feature_layers") == (2, 6, 9)
    assert fused_layers(Eagle3TrainConfig(feature_layers=(2, 6, 11)), 12, "train.feature_layers") == (2, 6, 11)
    with pytest.raises(ConfigError, match="^train.feature_layers: the target has 12 layers.*name layers below 12"):
        fused_layers(Eagle3TrainConfig(feature_layers=(2, 6, 12)), 12, "train.feature_layers")


def test_training_time_test_unrolls_exactly_what_drafting_computes(zoo_models):
    """Step i of the training unroll at position t equals the head's cached drafting: step 0 over the real
    features up to t, then i deeper tokens, each fed the previous step's own h (fails if the unrolled attention
    saw other positions' later steps, or shifted positions or tokens)."""
    from transformers import DynamicCache

    from training.eagle3 import unrolled_attention

    models, _ = zoo_models
    target = models.target.model
    head = random_head(target, seed=4)
    hidden = int(target.config.hidden_size)
    torch.manual_seed(1)
    length, steps = 12, 3
    ids = torch.randint(0, int(target.config.vocab_size), (1, length))
    fused = torch.randn(1, length, 3 * hidden)
    with torch.no_grad():
        feature, keys, values, unrolled = head.fuse(fused[:, :-1]), [], [], []
        for step in range(steps):
            tokens = torch.nn.functional.pad(ids[:, 1 + step:], (0, step))[:, : length - 1]
            positions = torch.arange(length - 1)[None] + step
            feature = head.midlayer(head.embed_tokens(tokens), feature,
                                    lambda x: unrolled_attention(head, x, positions, keys, values))
            unrolled.append(feature)
        for t in (0, 4, length - 1 - steps):
            cache = DynamicCache()
            out = head(ids[:, 1:t + 2], fused[:, :t + 1], cache=cache, use_cache=True)
            mine = out.hidden_states[0][:, -1:]
            torch.testing.assert_close(mine[0, 0], unrolled[0][0, t], rtol=1e-4, atol=1e-4)
            for step in range(1, steps):
                out = head(ids[:, t + 1 + step: t + 2 + step], mine, position_ids=torch.tensor([[t + step]]),
                           cache=cache, use_cache=True)
                mine = out.hidden_states[0]
                torch.testing.assert_close(mine[0, 0], unrolled[step][0, t], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained_eagle3(tiny_zoo, zoo_models):
    from harness.core.paths import specsweep_home
    from training.artifacts import build_artifact, load_artifact, load_train_config

    request = load_train_config(TINY_EAGLE3, "eagle3", specsweep_home(), tiny_zoo)
    build_artifact(request, log=lambda message: None)
    models, _ = zoo_models
    return load_artifact(request, models.target), request.manifest()["metrics"]


def test_training_lowers_the_loss_of_every_unrolled_step(trained_eagle3):
    _, metrics = trained_eagle3
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert after["loss"] < before["loss"]
    assert after["top1_step0"] > before["top1_step0"]
    assert metrics["feature_layers"] == list(feature_layers(4))


def test_a_finished_job_leaves_no_resume_checkpoints(trained_eagle3, tiny_zoo):
    from harness.core.paths import specsweep_home
    from training.artifacts import load_train_config
    from training.launch import resume_dir

    request = load_train_config(TINY_EAGLE3, "eagle3", specsweep_home(), tiny_zoo)
    assert request.built() and not resume_dir(request.directory).exists()


@pytest.mark.parametrize("params", [{"total_tokens": 8, "depth": 4, "top_k": 2}, {"total_tokens": 12, "depth": 3,
                                                                                  "top_k": 3}])
def test_greedy_eagle3_equals_autoregressive(trained_eagle3, zoo_models, zoo_prompts, params):
    from dataclasses import replace

    head, _ = trained_eagle3
    models, _ = zoo_models
    models = replace(models, artifacts={**models.artifacts, "head3": head})
    baseline = build("autoregressive", {}, models)
    strategy = build("eagle3", {"head": "head3", **params}, models)
    for ids in zoo_prompts:
        got = strategy.generate(ids, 40, Sampling())
        assert got.tokens == baseline.generate(ids, 40, Sampling()).tokens
        assert got.drafted > 0


BATCHED_TREES = [{"total_tokens": 8, "depth": 4, "top_k": 2}, {"total_tokens": 12, "depth": 3, "top_k": 3}]


@pytest.mark.parametrize("params", BATCHED_TREES)
def test_greedy_rows_at_batch_4_equal_the_batch_1_baseline(trained_eagle3, zoo_models, zoo_prompts, params):
    from dataclasses import replace

    from tests.test_batching import check_greedy_rows_equal_batch_1, ragged

    head, _ = trained_eagle3
    models = replace(zoo_models[0], artifacts={**zoo_models[0].artifacts, "head3": head})
    check_greedy_rows_equal_batch_1(models, ragged(zoo_prompts), "eagle3", {"head": "head3", **params})


def test_batched_rows_stop_at_their_own_eos(trained_eagle3, zoo_models, zoo_prompts):
    from dataclasses import replace

    from tests.test_batching import check_rows_stop_at_their_own_eos, ragged

    head, _ = trained_eagle3
    models = replace(zoo_models[0], artifacts={**zoo_models[0].artifacts, "head3": head})
    check_rows_stop_at_their_own_eos(models, ragged(zoo_prompts), "eagle3", {"head": "head3", **BATCHED_TREES[0]})


def test_sampling_at_batch_4_keeps_each_rows_target_distribution():
    from harness.core.lm import CausalLM
    from strategies import ModelSet
    from tests.test_batching import SAMPLED_VOCAB, check_rows_sample_their_target_distribution
    from tests.test_speculative import tiny_llama

    target_model = tiny_llama(1, SAMPLED_VOCAB)
    models = ModelSet(target=CausalLM(target_model, "target"),
                      artifacts={"head3": CausalLM(random_head(target_model, seed=3), "eagle3-head")})
    check_rows_sample_their_target_distribution(models, "eagle3", {"head": "head3", "total_tokens": 4, "depth": 2,
                                                                   "top_k": 2})
