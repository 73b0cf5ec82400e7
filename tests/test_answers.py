"""The target's own answers as training text: batched greedy answers, their cache, and source checks."""

from __future__ import annotations

import pytest
import torch

from harness.core.errors import ConfigError
from harness.core.prompts import QA_TEMPLATE
from training.answers import AnswerSettings, answer_transcripts, cached_answers, user_messages
from training.text import check_sources, token_windows

DOCUMENTS = ["The quick brown fox jumps over the lazy dog. " * 20, "def add(a, b):\n    return a + b\n" * 30]


def test_zoo_messages_put_an_instruction_before_a_snippet_and_files_pass_text_through():
    settings = AnswerSettings(prompts=4, snippet_chars=50)
    zoo = user_messages("zoo:prose", DOCUMENTS, settings)
    assert len(zoo) == 4 and all("\n\n" in message and len(message.split("\n\n", 1)[1]) <= 50 for message in zoo)
    assert len({message.split("\n\n", 1)[0] for message in zoo}) == 4  # instructions rotate
    assert all(any(document.startswith(message) for document in DOCUMENTS)  # file rows are the messages, cut long
               for message in user_messages("prompts.jsonl", DOCUMENTS, settings))
    assert user_messages("zoo:prose", DOCUMENTS, settings) == zoo  # seeded


def test_batched_answers_equal_one_prompt_at_a_time_greedy_decoding(zoo_models):
    models, tokenizer = zoo_models
    model = models.target.model
    messages = ["Explain a tree.", "Summarize the following text in a few sentences.\n\n" + DOCUMENTS[0][:200]]
    side = tokenizer.padding_side
    batched = answer_transcripts(model, tokenizer, messages, AnswerSettings(max_new_tokens=10, batch_size=2))
    assert tokenizer.padding_side == side  # restored
    for message, transcript in zip(messages, batched):
        prompt = QA_TEMPLATE.format(question=message.strip())
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        alone = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert alone and transcript == prompt + alone + tokenizer.eos_token


def test_answers_are_generated_once_then_read_from_the_cache(zoo_models, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path))
    models, tokenizer = zoo_models
    settings = AnswerSettings(prompts=3, max_new_tokens=6)
    first = cached_answers(models.target.model, tokenizer, "zoo:prose", DOCUMENTS, settings, "target-a", log=lambda m: None)
    again = cached_answers(None, tokenizer, "zoo:prose", DOCUMENTS, settings, "target-a", log=lambda m: None)
    assert again == first and len(first) == 3
    with pytest.raises(AttributeError):  # another target's answers are not served from this cache
        cached_answers(None, tokenizer, "zoo:prose", DOCUMENTS, settings, "target-b", log=lambda m: None)


def test_answers_sources_are_refused_where_no_target_answers(tiny_zoo, zoo_models):
    from training.settings import parse_domains

    with pytest.raises(ConfigError, match=r"domains\.code.*only kind: draft and kind: eagle"):
        parse_domains({"code": ["answers:zoo:code"]}, "domains")
    with pytest.raises(ConfigError, match="names no text source"):
        check_sources(("answers:",), "data.sources", answers_allowed=True)
    _, tokenizer = zoo_models
    data = type("Data", (), {"sources": ("answers:zoo:prose",), "field": "text", "samples": 2, "seq_len": 8,
                             "seed": 0, "answer_prompts": 2, "answer_tokens": 4})()
    with pytest.raises(ConfigError, match="needs the target model"):
        token_windows(tokenizer, data, tiny_zoo.corpus)


def test_a_draft_config_checks_its_answer_settings(tmp_path):
    from training.eagle_data import FeatureDataConfig

    with pytest.raises(ConfigError, match=r"data\.answer_tokens"):
        FeatureDataConfig.from_dict({"sources": ["answers:zoo:code"], "answer_tokens": 0}, "data")
    assert FeatureDataConfig.from_dict({"sources": ["answers:zoo:code"]}, "data").answer_prompts == 256
