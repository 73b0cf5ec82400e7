"""What real targets need: chat templates, the built-in Spec-Bench set, model spec fields, early-exit and
vocabulary-subset drafts, tokenizer checks before Ray starts, published EAGLE heads and distilled drafts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from harness.core.errors import ConfigError
from tests.conftest import write_sweep

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def prompt_set(**raw):
    from harness.core.prompts import parse_prompt_set

    return parse_prompt_set({"name": "p", "source": "specbench", **raw}, "prompts[0]", Path("."))


@pytest.fixture()
def templated_tokenizer(zoo_models):
    import copy

    _, tokenizer = zoo_models
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHATML
    return tokenizer


# ---------------------------------------------------------------------------- chat templates


def test_a_multi_turn_prompt_goes_through_the_chat_template(templated_tokenizer):
    from harness.core.prompts import conversation_ids, template_label

    spec = prompt_set(system_prompt="Be brief.")
    conversation = ["Write a haiku.", "Leaves fall.", "Now another."]
    ids = conversation_ids(templated_tokenizer, spec, conversation, 10**6)
    expected = ("<|system|>Be brief.</s><|user|>Write a haiku.</s><|assistant|>Leaves fall.</s>"
                "<|user|>Now another.</s><|assistant|>")
    assert ids == templated_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert template_label(templated_tokenizer, spec).startswith("tokenizer:")
    assert template_label(templated_tokenizer, spec).endswith("+system")


def test_template_none_leaves_the_prompt_as_plain_text(templated_tokenizer):
    from harness.core.prompts import QA_TEMPLATE, conversation_ids, template_label

    spec = prompt_set(template="none")
    ids = conversation_ids(templated_tokenizer, spec, ["Write a haiku."], 10**6)
    assert ids == templated_tokenizer(QA_TEMPLATE.format(question="Write a haiku."))["input_ids"]
    assert template_label(templated_tokenizer, spec) == "none"


def test_a_template_file_replaces_the_tokenizers_and_enters_the_cell_identity(tmp_path, zoo_models):
    from harness.core.prompts import conversation_ids, parse_prompt_set, template_label

    _, tokenizer = zoo_models  # the zoo tokenizer has no template of its own
    (tmp_path / "mine.jinja").write_text(CHATML)
    spec = parse_prompt_set({"name": "p", "source": "specbench", "template": "mine.jinja"}, "prompts[0]", tmp_path)
    ids = conversation_ids(tokenizer, spec, ["Hello"], 10**6)
    assert ids == tokenizer("<|user|>Hello</s><|assistant|>", add_special_tokens=False)["input_ids"]
    assert template_label(tokenizer, spec).startswith("file:mine.jinja:")
    (tmp_path / "other.jinja").write_text(CHATML.replace("|>", "]"))
    other = parse_prompt_set({"name": "p", "source": "specbench", "template": "other.jinja"}, "prompts[0]", tmp_path)
    assert spec.key() != other.key()
    assert "template" not in prompt_set().key() and "system_prompt" not in prompt_set().key()  # old ids unchanged


def test_template_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"prompts\[0\]\.template: chat template file 'missing.jinja' not found"):
        prompt_set(template="missing.jinja")
    with pytest.raises(ConfigError, match=r"prompts\[0\]\.system_prompt"):
        prompt_set(system_prompt="")


# ---------------------------------------------------------------------------- Spec-Bench built in


def test_specbench_is_built_in_with_category_filters():
    from harness.core.prompts import SPEC_BENCH_CATEGORIES, load_prompts

    everything = load_prompts(prompt_set())
    assert len(everything) == 480
    assert {p.category for p in everything} == set(SPEC_BENCH_CATEGORIES)
    assert sum(len(p.turns) == 2 for p in everything) == 80  # MT-bench's two-turn questions
    translation = load_prompts(prompt_set(categories=["translation"], count=5))
    assert len(translation) == 5 and {p.category for p in translation} == {"translation"}
    balanced = load_prompts(prompt_set(per_category=2))
    assert len(balanced) == 26 and all(sum(p.category == c for p in balanced) == 2 for c in SPEC_BENCH_CATEGORIES)
    with pytest.raises(ConfigError, match=r"prompts\[0\]\.categories: Spec-Bench has no category 'poetry'"):
        prompt_set(categories=["poetry"])


# ---------------------------------------------------------------------------- model spec fields


@pytest.mark.parametrize("raw, message", [
    ({"id": "zoo:target", "trust_remote_code": "yes"}, r"\.trust_remote_code: expected true or false"),
    ({"id": "zoo:target", "num_gpus": 2}, r"\.num_gpus: 2 GPUs but no device_map"),
    ({"id": "zoo:target", "layers": 0}, r"\.layers: expected an integer >= 1"),
    ({"id": "zoo:target", "attn_implementation": 3}, r"\.attn_implementation: expected a string"),
    ({"id": "zoo:target", "revison": "main"}, r"\.revison: unknown key"),
    ({"id": "pkg:no-such-model"}, r"\.id: .*no-such-model"),
    ({"id": "gguf:missing.gguf"}, r"\.id: .*missing.gguf"),
])
def test_model_spec_errors_name_the_field(raw, message):
    from harness.core.models import parse_model_spec

    with pytest.raises(ConfigError, match=r"models\.targets\.target" + message):
        parse_model_spec(raw, "models.targets.target", "float32", ("target",), Path("."))


def test_new_spec_fields_keep_old_cell_ids_and_enter_new_ones():
    from harness.core.models import parse_model_spec

    plain = parse_model_spec("zoo:target", "t", "float32", ("target",), Path("."))
    assert plain.as_dict() == {"id": "zoo:target", "dtype": "float32", "revision": None}
    exits = parse_model_spec({"id": "zoo:target", "layers": 2, "attn_implementation": "eager"}, "t", "float32",
                             ("target",), Path("."))
    assert exits.as_dict()["layers"] == 2 and exits.as_dict()["attn_implementation"] == "eager"


def test_an_early_exit_draft_is_the_targets_first_layers_and_drafts_losslessly(tiny_zoo, zoo_models, zoo_prompts):
    from harness.core.models import ModelSpec, load_model
    from strategies import ModelSet, Sampling, build

    models, _ = zoo_models
    draft = load_model(ModelSpec("zoo:target", layers=2), tiny_zoo, torch.device("cpu"), "exit-2l")
    assert len(draft.model.get_decoder().layers) == 2
    target = models.target.model
    ids = torch.tensor([zoo_prompts[0]])
    with torch.no_grad():
        hidden = target.get_decoder().embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        rotary = target.get_decoder().rotary_emb(hidden, positions)
        for layer in target.get_decoder().layers[:2]:
            hidden = layer(hidden, position_embeddings=rotary, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = target.lm_head(target.get_decoder().norm(hidden))
        torch.testing.assert_close(draft.model(input_ids=ids).logits, expected)
    pair = ModelSet(target=models.target, drafts={"exit": draft})
    baseline, speculative = build("autoregressive", {}, pair), build("speculative", {"draft": "exit", "gamma": 3}, pair)
    for prompt in zoo_prompts:
        assert speculative.generate(prompt, 20, Sampling()).tokens == baseline.generate(prompt, 20, Sampling()).tokens


def test_a_vocabulary_subset_draft_drafts_only_from_the_subset_and_stays_lossless(tiny_zoo, zoo_models, zoo_prompts):
    from harness.core.lm import CausalLM
    from harness.core.models import ModelSpec, load_model
    from strategies import ModelSet, Sampling, build

    models, _ = zoo_models
    full = load_model(ModelSpec("zoo:draft-1l"), tiny_zoo, torch.device("cpu"), "full")
    subset = list(range(0, models.target.vocab_size, 2))
    cut = CausalLM(full.model, name="cut", vocab_subset=subset)
    logits = cut.prefill(zoo_prompts[0], all_logits=True).logits
    reference = full.prefill(zoo_prompts[0], all_logits=True).logits
    assert torch.isinf(logits[:, 1::2]).all()
    torch.testing.assert_close(logits[:, ::2], reference[:, ::2])
    assert cut.num_parameters < full.num_parameters
    pair = ModelSet(target=models.target, drafts={"cut": cut})
    baseline, speculative = build("autoregressive", {}, pair), build("speculative", {"draft": "cut", "gamma": 3}, pair)
    for prompt in zoo_prompts:
        assert speculative.generate(prompt, 20, Sampling()).tokens == baseline.generate(prompt, 20, Sampling()).tokens


# ---------------------------------------------------------------------------- tokenizers, before Ray starts


def other_tokenizer_draft(tiny_zoo, directory: Path) -> Path:
    """The zoo's 1-layer draft with a tokenizer of the same size whose two ordinary tokens swap ids."""
    import json

    from harness.core.models import ModelSpec, pretrained_location

    source = Path(pretrained_location(ModelSpec("zoo:draft-1l"), tiny_zoo))
    directory.mkdir()
    for path in source.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])][100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


def test_a_draft_with_another_tokenizer_of_the_same_size_is_refused_before_ray_starts(tmp_path, tiny_zoo):
    import ray

    from harness.driver.config import load_sweep
    from harness.driver.scheduler import run_sweep

    draft = other_tokenizer_draft(tiny_zoo, tmp_path / "other")
    path = write_sweep(tmp_path / "sweep.yaml", models={"target": "zoo:target", "drafts": {"small": str(draft)},
                                                        "device": "cpu"})
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(ConfigError, match=r"models\.drafts\.small: its tokenizer differs from target 'target'.*"
                                          r"both have 512 tokens"):
        run_sweep(load_sweep(path), tmp_path / "run", log=lambda message: None)
    assert not ray.is_initialized()
    assert not (tmp_path / "run" / "cells.jsonl").exists()


def test_hf_assisted_may_use_a_draft_with_another_tokenizer(tmp_path, tiny_zoo):
    from harness.driver.config import load_sweep
    from harness.driver.preflight import check_tokenizers

    draft = other_tokenizer_draft(tiny_zoo, tmp_path / "other")
    path = write_sweep(tmp_path / "sweep.yaml", models={"target": "zoo:target", "drafts": {"small": str(draft)},
                                                        "device": "cpu"},
                       strategies=[{"name": "hf_assisted", "params": {"draft": "small"}}])
    sweep = load_sweep(path)
    check_tokenizers(sweep)  # hf_assisted translates between the vocabularies: accepted
    refused = write_sweep(tmp_path / "refused.yaml", models={"target": "zoo:target", "drafts": {"small": str(draft)},
                                                             "device": "cpu"},
                          strategies=[{"name": "speculative", "params": {"draft": "small"}}])
    with pytest.raises(ConfigError, match="models.drafts.small: its tokenizer differs from target 'target'"):
        check_tokenizers(load_sweep(refused))  # the same draft under a strategy that needs one vocabulary


# ---------------------------------------------------------------------------- published EAGLE heads


def test_a_head_saved_in_the_published_layout_loads_and_reproduces_its_drafts(tmp_path, zoo_models, zoo_prompts):
    from strategies.eagle_head import EagleHead, head_config, load_head, save_head, save_published

    models, _ = zoo_models
    target = models.target.model
    torch.manual_seed(0)
    head = EagleHead(head_config(target.config), target.get_input_embeddings(), target.get_output_embeddings()).eval()
    with torch.no_grad():
        for parameter in head.fc.parameters():
            parameter.normal_(0, 0.2)  # fc's two halves must differ for the column order to matter
    save_published(head, tmp_path / "published")
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_head(tmp_path / "published", target)
    ids = torch.tensor([zoo_prompts[1]])
    with torch.no_grad():
        features = target(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        expected = head(input_ids=ids[:, 1:], features=features[:, :-1]).logits
        torch.testing.assert_close(loaded(input_ids=ids[:, 1:], features=features[:, :-1]).logits, expected)
    # a .bin checkpoint (loaded with weights_only=True) works the same
    from safetensors.torch import load_file

    (tmp_path / "bin").mkdir()
    torch.save(load_file(str(tmp_path / "published" / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "published" / "config.json").read_text())
    with torch.no_grad():
        bin_logits = load_head(tmp_path / "bin", target)(input_ids=ids[:, 1:], features=features[:, :-1]).logits
    torch.testing.assert_close(bin_logits, expected)
    # specsweep's own layout keeps a vocabulary subset: -inf outside it, the same logits inside
    subset = list(range(0, target.config.vocab_size, 3))
    cut = EagleHead(head.config, target.get_input_embeddings(), target.get_output_embeddings(), subset)
    cut.load_state_dict(head.state_dict())
    save_head(cut, tmp_path / "own")
    with torch.no_grad():
        own = load_head(tmp_path / "own", target)(input_ids=ids[:, 1:], features=features[:, :-1]).logits
    torch.testing.assert_close(own[..., ::3], expected[..., ::3])
    assert torch.isinf(own[..., 1::3]).all()


def test_eagle_drafts_from_a_head_directory_losslessly(tmp_path, zoo_models, zoo_prompts):
    from strategies import Sampling, build
    from strategies.eagle_head import EagleHead, head_config, save_published

    models, _ = zoo_models
    target = models.target.model
    torch.manual_seed(1)
    head = EagleHead(head_config(target.config), target.get_input_embeddings(), target.get_output_embeddings())
    save_published(head, tmp_path / "published")
    baseline = build("autoregressive", {}, models)
    for name, params in (("eagle", {"gamma": 3}), ("eagle2", {"total_tokens": 6, "depth": 3, "top_k": 2})):
        strategy = build(name, {"head_dir": str(tmp_path / "published"), **params}, models)
        for prompt in zoo_prompts[:3]:
            assert strategy.generate(prompt, 16, Sampling()).tokens == baseline.generate(prompt, 16, Sampling()).tokens


def test_eagle_needs_exactly_one_head_source(tmp_path):
    from strategies import parse_params

    with pytest.raises(ConfigError, match=r"s\.head: give exactly one of head"):
        parse_params("eagle", {"gamma": 2}, "s")
    with pytest.raises(ConfigError, match=r"s\.head_dir: .* is not a directory"):
        parse_params("eagle2", {"head_dir": str(tmp_path / "nothing")}, "s")


# ---------------------------------------------------------------------------- distilled drafts

TINY_DRAFT = {
    "kind": "draft",
    "target": "zoo:target",
    "layers": 1,
    "vocab_subset": 300,
    "data": {"sources": ["zoo:code", "answers:zoo:prose"], "samples": 64, "seq_len": 32,
             "answer_prompts": 6, "answer_tokens": 12},
    "steps": 30,
    "batch_size": 8,
    "lr": 0.003,
    "warmup_steps": 3,
    "launch": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 1},
}


def test_a_sweep_distils_a_train_draft_once_and_decodes_losslessly_with_it(tmp_path, tiny_zoo):
    import json

    from harness.core.models import VOCAB_SUBSET_FILE
    from harness.driver.config import load_sweep
    from harness.driver.scheduler import run_sweep

    (tmp_path / "draft.yaml").write_text(yaml.safe_dump(TINY_DRAFT))
    path = write_sweep(tmp_path / "sweep.yaml", name="tiny-draft", train={"distilled": "draft.yaml"},
                       models={"target": "zoo:target", "drafts": {"small": "train:distilled"}, "device": "cpu"},
                       strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 3}}],
                       run={"max_new_tokens": 12, "warmup_prompts": 1, "workers": 2, "num_cpus": 2,
                            "pairing": "shared"})
    sweep = load_sweep(path)
    request = sweep.draft_artifacts["small"]
    assert sweep.drafts["small"].id == request.model_id()
    outcome = run_sweep(sweep, tmp_path / "run", log=lambda message: None)
    assert len(outcome.trained) == 1
    assert outcome.failed == 0 and outcome.ok == outcome.total == 2  # greedy equality with the baseline
    metrics = request.manifest()["metrics"]
    assert metrics["eval_after"]["kl"] < metrics["eval_before"]["kl"]
    subset = json.loads((request.directory / "model" / VOCAB_SUBSET_FILE).read_text())
    assert len(subset) >= 300 and metrics["vocab_subset"] == len(subset)
    answers = list((Path(os.environ["SPECSWEEP_HOME"]) / "artifacts" / "answers").glob("*.jsonl"))
    assert len(answers) == 1 and len(answers[0].read_text().splitlines()) == 6  # the target answered in the job


def test_a_train_draft_must_name_a_draft_entry(tmp_path, tiny_zoo):
    from harness.driver.config import load_sweep

    path = write_sweep(tmp_path / "sweep.yaml", models={"target": "zoo:target", "drafts": {"small": "train:nope"}})
    with pytest.raises(ConfigError, match=r"models\.drafts\.small\.id: 'train:nope' names no draft"):
        load_sweep(path)


def test_an_eagle_head_takes_its_targets_rope_settings():
    from transformers import LlamaConfig

    from strategies.eagle_head import head_config

    target = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    head = head_config(target)
    assert head.rope_parameters["rope_theta"] == 100000.0
    assert head.num_hidden_layers == 1 and head.num_key_value_heads == 2


def test_a_draft_or_head_cast_to_bf16_for_training_leaves_its_float32_teacher_untouched(zoo_models):
    """DeepSpeed casts the module it trains to bf16 on GPU, in place: nothing it holds may be the target's."""
    import copy

    from training.draft import distill_loss, early_exit_draft
    from training.eagle import training_head

    models, _ = zoo_models
    target = copy.deepcopy(models.target.model)
    student = early_exit_draft(target, 1).bfloat16()  # as DeepSpeed's bf16 engine does
    head = training_head(target, None, None).bfloat16()
    assert {p.dtype for p in target.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in (*student.get_input_embeddings().parameters(),
                                             *head.lm_head.parameters()))
    ids = torch.randint(0, target.config.vocab_size, (2, 8))
    kl, stats = distill_loss(student, target, ids, target.get_output_embeddings().weight)
    assert torch.isfinite(kl) and 0.0 <= stats["top1"] <= 1.0
