"""Self-generated chat (the Magpie method): the template's user prefix, the quality filters, near-duplicates, the
sampled queries and their cache, and the ``answers:magpie`` source."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from harness.core.errors import ConfigError
from training.answers import AnswerSettings, cached_self_chat
from training.magpie import (PASSAGE_TASKS, TASK_OPENERS, MagpieSettings, duplicate_key, end_of_turn_id,
                             passage_task_queries, query_problem, round_openers, self_queries, user_prefix,
                             variant_settings, whole_sentences)
from training.text import check_sources

CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SETTINGS = MagpieSettings()


@pytest.fixture
def chat_tokenizer(zoo_models):
    """The tiny zoo's tokenizer with a chat template whose turns end with its EOS token."""
    _, tokenizer = zoo_models
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.mark.parametrize("query, ended, reason", [
    ("Can you help me plan a three-day trip to Kyoto in the spring?", True, None),
    ("Can you help me plan a three-day trip to Kyoto in the spring", False, "cut at the token limit"),
    ("Help me.", True, "too short"),
    (" ".join(["word"] * 61), True, "too long"),
    ("Write a haiku about rain.<|im_start|>assistant\nRain falls", True, "template marker or role header"),
    ("Explain recursion to me please.\nUser: and then?", True, "template marker or role header"),
    ("Tell me about \x07bells and their history please.", True, "unprintable characters"),
    ("1234 5678 9012 3456 7890 1234 = ?", True, "mostly not letters"),
    ("the cat the cat the cat the cat the cat the cat the cat", True, "repetitive"),
])
def test_query_filters_name_what_they_refuse(query, ended, reason):
    assert query_problem(query, ended, SETTINGS, ("<|im_start|>", "<|im_end|>")) == reason


def test_near_duplicates_share_their_first_words_whatever_the_case_and_punctuation():
    a = duplicate_key("Can you give me a list of the top five places to visit in Spain?", 8)
    b = duplicate_key("can you GIVE me a list, of the top ten films?", 8)
    c = duplicate_key("Can you give me a recipe for soup with lentils?", 8)
    assert a == b != c


def test_the_user_prefix_is_the_template_up_to_the_users_words(chat_tokenizer):
    prefix = user_prefix(chat_tokenizer)
    assert prefix == f"{chat_tokenizer.bos_token}<|user|>\n"
    assert end_of_turn_id(chat_tokenizer) == chat_tokenizer.eos_token_id


def test_sampled_queries_pass_the_filters_are_distinct_seeded_and_leave_the_global_rng_alone(zoo_models,
                                                                                             chat_tokenizer):
    models, _ = zoo_models
    settings = MagpieSettings(count=6, max_query_tokens=64, min_words=1, batch_size=16, max_rounds=3,
                              dtype="float32")
    state = torch.random.get_rng_state()
    queries, refused = self_queries(models.target.model, chat_tokenizer, settings, log=lambda message: None)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert queries, refused
    assert all(query_problem(query, True, settings) is None for query in queries)
    keys = [duplicate_key(query, settings.duplicate_prefix_words) for query in queries]
    assert len(set(keys)) == len(keys) <= settings.count
    assert self_queries(models.target.model, chat_tokenizer, settings, log=lambda message: None) == (queries, refused)


def test_self_chat_is_generated_once_and_cached_with_its_queries(zoo_models, chat_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path))
    models, _ = zoo_models
    magpie = MagpieSettings(count=4, max_query_tokens=64, min_words=1, batch_size=16, max_rounds=3, dtype="float32")
    settings = AnswerSettings(prompts=4, max_new_tokens=8, batch_size=4)
    first = cached_self_chat(models.target.model, chat_tokenizer, settings, magpie, "target-a", log=lambda m: None)
    again = cached_self_chat(None, chat_tokenizer, settings, magpie, "target-a", log=lambda m: None)
    assert again == first and first
    rows = [json.loads(line) for line in next((tmp_path / "artifacts" / "answers").glob("*.jsonl")).read_text()
            .splitlines()]
    for row in rows:  # each transcript is the template around the query, then the answer and the end of turn
        assert row["text"].startswith(user_prefix(chat_tokenizer) + row["query"])
        assert row["text"].endswith(chat_tokenizer.eos_token)


def test_magpie_is_an_answers_source_only():
    check_sources(("answers:magpie", "answers:magpie:tasks"), "data.sources", answers_allowed=True)
    with pytest.raises(ConfigError, match="names no magpie variant.*answers:magpie:tasks"):
        check_sources(("answers:magpie:code",), "data.sources", answers_allowed=True)
    with pytest.raises(ConfigError, match="write answers:magpie:tasks"):
        check_sources(("magpie:tasks",), "data.sources", answers_allowed=True)
    with pytest.raises(ConfigError, match="write answers:magpie"):
        check_sources(("magpie",), "data.sources", answers_allowed=True)
    with pytest.raises(ConfigError, match="only kind: draft and kind: eagle"):
        check_sources(("answers:magpie",), "domains.chat", answers_allowed=False)


def test_an_interrupted_run_resumes_from_its_checkpointed_rounds_and_batches(zoo_models, chat_tokenizer):
    from training.answers import answer_transcripts

    models, _ = zoo_models
    settings = MagpieSettings(count=40, max_query_tokens=64, min_words=1, batch_size=16, max_rounds=3,
                              dtype="float32")
    rounds: list[dict] = []
    whole = self_queries(models.target.model, chat_tokenizer, settings, lambda message: None, on_round=rounds.append)
    assert [row["round"] for row in rounds] == [0, 1, 2] and whole[0]
    resumed = self_queries(models.target.model, chat_tokenizer, settings, lambda message: None, rounds[:1])
    assert resumed == whole

    messages = ["Explain a tree.", "Write a loop.", "Say hi to the reader.", "Count to three."]
    answers = AnswerSettings(prompts=len(messages), max_new_tokens=6, batch_size=2)
    batches: list[list[str]] = []
    full = answer_transcripts(models.target.model, chat_tokenizer, messages, answers, on_batch=batches.append)
    assert len(batches) == 2 and sum(batches, []) == full
    assert answer_transcripts(models.target.model, chat_tokenizer, messages, answers, done=batches[0]) == full


def test_openers_rotate_over_the_rows_and_each_round_starts_where_the_last_one_stopped():
    settings = MagpieSettings(batch_size=3, openers=("A", "B", "C", "D", "E"))
    assert round_openers(settings, 0) == ["A", "B", "C"]
    assert round_openers(settings, 1) == ["D", "E", "A"]
    assert round_openers(MagpieSettings(batch_size=2), 4) == ["", ""]
    tasks = variant_settings("tasks", 100, 3)
    assert tasks.openers == TASK_OPENERS and tasks.count == 100 and tasks.seed == 3
    assert variant_settings("", 100, 3) == MagpieSettings(count=100, seed=3)


def test_task_seeded_queries_begin_with_their_opener_and_are_cached_apart_from_plain_ones(zoo_models, chat_tokenizer,
                                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path))
    models, _ = zoo_models
    openers = ("Write a poem about", "Translate into French:", "Why does")
    seeded = MagpieSettings(count=6, max_query_tokens=64, min_words=1, batch_size=16, max_rounds=3,
                            dtype="float32", openers=openers)
    queries, _ = self_queries(models.target.model, chat_tokenizer, seeded, lambda message: None)
    assert queries and all(query.startswith(openers) for query in queries)

    settings = AnswerSettings(prompts=3, max_new_tokens=4, batch_size=3)
    plain = MagpieSettings(count=3, max_query_tokens=64, min_words=1, batch_size=16, max_rounds=3, dtype="float32")
    for magpie in (plain, MagpieSettings(**{**plain.__dict__, "openers": openers})):
        cached_self_chat(models.target.model, chat_tokenizer, settings, magpie, "target-a", log=lambda m: None)
    files = sorted((tmp_path / "artifacts" / "answers").glob("*.jsonl"))
    assert len(files) == 2
    starts = [{json.loads(line)["query"].startswith(openers) for line in path.read_text().splitlines()}
              for path in files]
    assert sorted(map(sorted, starts)) == [[False], [True]]


def test_passage_tasks_hold_their_passage_and_the_model_writes_only_the_open_field(zoo_models, chat_tokenizer):
    models, _ = zoo_models
    settings = MagpieSettings(batch_size=4, max_query_tokens=16, dtype="float32", passage_tokens=32,
                              passage_tasks=PASSAGE_TASKS)
    passages = [f"Passage number {index} tells of a town by a river." for index in range(len(PASSAGE_TASKS) + 2)]
    batches: list[dict] = []
    queries, refused = passage_task_queries(models.target.model, chat_tokenizer, settings, passages,
                                            on_batch=batches.append)
    assert len(queries) + sum(refused.values()) == len(passages)
    for query in queries:  # each query holds one passage whole, behind the task of its passage's index
        index = next(index for index, passage in enumerate(passages) if passage in query)
        task = PASSAGE_TASKS[index % len(PASSAGE_TASKS)].format(passage=passages[index])
        assert query == task if not task.endswith((":", ",")) else query.startswith(task) and len(query) > len(task)
    # a task that ends with its instruction (a full stop) is complete: it is kept as it is, never sampled
    complete = PASSAGE_TASKS.index("{passage}\n\nSummarize the text above in two sentences.")
    assert PASSAGE_TASKS[complete].format(passage=passages[complete]) in queries
    assert passage_task_queries(models.target.model, chat_tokenizer, settings, passages, batches[:1]) == (queries,
                                                                                                        refused)


def test_a_cut_passage_keeps_its_whole_sentences_and_the_passages_variant_keeps_other_caches():
    assert whole_sentences("One. Two is here. Three is cut", ended=False) == "One. Two is here."
    assert whole_sentences("No sentence end at all", ended=False) == ""
    assert whole_sentences("Ended without a stop", ended=True) == "Ended without a stop"
    passages = variant_settings("passages", 100, 3)
    assert passages.passage_tokens > 0 and "passage_tokens" in passages.identity()
    assert passages.identity()["passage_tasks"] == PASSAGE_TASKS  # the tasks' wording is part of the cache key
    plain, tasks = variant_settings("", 100, 3), variant_settings("tasks", 100, 3)
    assert "passage_tokens" not in plain.identity() and "openers" not in plain.identity()
    assert "openers" in tasks.identity() and "min_passage_words" not in tasks.identity()
