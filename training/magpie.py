"""User queries that the target writes itself (the Magpie method), for self-generated chat training data.

An aligned chat model, given only its chat template's prefix up to the start
of a user turn (system prompt included), continues it with a plausible user
query: Xu et al. 2024, "Magpie: Alignment Data Synthesis from Scratch by
Prompting Aligned LLMs with Nothing". Its greedy answers to those queries
(``training.answers``) are then in-domain chat data for drafts and heads that
needs no hub and never reads a benchmark.

Queries are sampled in left-padded batches with transformers' ``generate()``
(temperature and top-p as set), stopped at the template's end-of-turn token,
and kept only if they pass ``query_problem``'s filters: the turn ended (not cut
by the token limit), length in words, printable text, no template markers or
role headers, no looping, and not a near-duplicate of an earlier query (same
first words, case and punctuation folded). Sampling goes on in rounds until
``count`` queries pass or ``max_rounds`` rounds are spent; each round is seeded
on its own, so an interrupted run resumes from its checkpointed rounds and
ends with the same queries.

A small model's unseeded queries are narrow: SmolLM2-135M-Instruct began 64 %
of its 1,962 with "I'm" or "Can". The ``tasks`` variant
(``answers:magpie:tasks``) writes the first words of each user turn itself,
rotating over ``TASK_OPENERS`` (generic task families of chat assistants:
writing, role-play, reasoning, arithmetic, code, extraction, science,
humanities, translation, summaries of a passage the model then writes, factual
questions, questions over a passage), and lets the model write the rest. This
is the Magpie paper's control of the query's task by the prompt, done with the
user turn's opening words instead of a system prompt (a 135M model follows a
system prompt loosely). The openers are written here; none comes from a
benchmark.

The ``passages`` variant (``answers:magpie:passages``) gives the model text to
work on, as summaries, extraction and questions over retrieved text need: the
model first writes writing requests from ``PASSAGE_OPENERS`` ("Write a news
article about", ...), answers each greedily (the passage, in its answering
voice rather than a sampled user turn's), and then each passage is set behind
one of ``PASSAGE_TASKS`` (summarise, list facts, extract, translate, answer a
question). Where a task ends in an open field ("Question:"), the model writes
the rest of the user turn, sampled and filtered like any Magpie query; the
answers to those user turns are the training text. Answering them means
copying from and condensing a passage in the context, which plain and
task-seeded queries rarely ask for.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

MAGPIE_SOURCE = "magpie"
TASK_OPENERS: tuple[str, ...] = (
    "Write a short story about", "Write a blog post about", "Compose a formal email to", "Write a poem about",
    "Draft a short speech for", "Write a product description for",
    "Imagine you are", "Pretend you are a", "Act as a",
    "Explain step by step why", "Solve this logic puzzle:", "Which is the better choice, and why:",
    "Calculate", "Solve for x:", "A shop sells", "Sarah has",
    "Write a Python function that", "Implement a class in Python that", "Fix the bug in this code:",
    "Write a SQL query that", "Explain what this code does:",
    "Extract all the names, dates and places from the following text:", "List the key facts in this paragraph:",
    "Explain how", "What is the difference between", "Describe the process of", "Why does",
    "Discuss the impact of", "Compare and contrast", "What were the main causes of",
    "Translate the following sentence into French:", "Translate this into English:", "Translate into Spanish:",
    "Summarize the following article:\n\n", "Summarize this news report in two sentences:\n\n",
    "Who", "When did", "Where is", "What year",
    "Read the passage below and answer the question at the end.\n\n",
    "Based on the following text, answer:",
)
PASSAGE_OPENERS: tuple[str, ...] = (
    "Write a news article about", "Write an encyclopedia entry about", "Write a short report on",
    "Write a short biography of", "Write a travel guide entry for", "Write a product review of",
    "Describe the history of", "Write a science news story about",
)
PASSAGE_TASKS: tuple[str, ...] = (
    "Summarize the following article:\n\n{passage}",
    "{passage}\n\nSummarize the text above in two sentences.",
    "List the key facts in this text:\n\n{passage}",
    "Extract all the names, dates and places from the following text:\n\n{passage}",
    "Translate the first two sentences of this text into French:\n\n{passage}",
    "Read the passage below and answer the question at the end.\n\n{passage}\n\nQuestion:",
    "{passage}\n\nBased on the text above,",
)
OPEN_FIELD_ENDS = (":", ",")  # a task ending so is an open field: the model writes the rest of the user turn
MAGPIE_VARIANTS = ("", "tasks", "passages")
_WORD = re.compile(r"[a-z0-9']+")
_ROLE_HEADER = re.compile(r"^\s*(user|assistant|system|human|chat|ai)\s*[:>]", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class MagpieSettings:
    """How queries are sampled and filtered (the defaults are what ``answers:magpie`` uses)."""

    count: int = 256
    max_query_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    min_words: int = 5
    max_words: int = 60
    duplicate_prefix_words: int = 8
    batch_size: int = 64
    max_rounds: int = 40
    dtype: str = "bfloat16"  # the benchmark's dtype on CPU and GPU; also what makes batched sampling fast on CPU
    seed: int = 0
    openers: tuple[str, ...] = ()  # first words of the user turns, rotated over the rows; empty: plain Magpie
    passage_tokens: int = 0  # > 0: the queries ask for passages of this many tokens, and tasks over them follow
    min_passage_words: int = 40
    passage_tasks: tuple[str, ...] = ()  # the tasks set over the passages, rotated (``PASSAGE_TASKS``)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the queries; a variant's fields are left out where they are off, so that
        adding one keeps the caches of the others."""
        off = {"openers": not self.openers, "passage_tokens": not self.passage_tokens,
               "min_passage_words": not self.passage_tokens, "passage_tasks": not self.passage_tokens}
        return {name: value for name, value in asdict(self).items() if not off.get(name, False)}


def variant_settings(variant: str, count: int, seed: int) -> MagpieSettings:
    """The settings of ``answers:magpie`` (variant ``""``) or ``answers:magpie:tasks`` (opener-seeded, with room
    for a passage in the query)."""
    if variant not in MAGPIE_VARIANTS:
        raise ValueError(f"unknown magpie variant {variant!r}")
    if variant == "tasks":
        return MagpieSettings(count=count, seed=seed, openers=TASK_OPENERS, max_query_tokens=160, max_words=120)
    if variant == "passages":
        return MagpieSettings(count=count, seed=seed, openers=PASSAGE_OPENERS, passage_tokens=128,
                              passage_tasks=PASSAGE_TASKS)
    return MagpieSettings(count=count, seed=seed)


def user_prefix(tokenizer: Any) -> str:
    """The chat template's text before a user message's content (system prompt and user header included)."""
    marker = "\u2063MAGPIE\u2063"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=False)
    if marker not in rendered:
        raise ValueError("the tokenizer's chat template does not render the user's message verbatim")
    return rendered[:rendered.index(marker)]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes a turn in the chat template (``<|im_end|>`` for ChatML), else EOS."""
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                          add_generation_prompt=False)
    after = probe[probe.index("x") + 1:]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return next((token for token in ids if token in special), tokenizer.eos_token_id)


def duplicate_key(query: str, words: int) -> str:
    """The near-duplicate key of ``query``: its first ``words`` words, lower-cased, punctuation dropped."""
    return " ".join(_WORD.findall(query.lower())[:words])


def query_problem(query: str, ended: bool, settings: MagpieSettings, markers: tuple[str, ...] = ()) -> str | None:
    """Why ``query`` is refused (a short reason), or ``None`` when it passes the quality filters."""
    text = query.strip()
    words = _WORD.findall(text.lower())
    if not ended:
        return "cut at the token limit"
    if len(words) < settings.min_words:
        return "too short"
    if len(words) > settings.max_words:
        return "too long"
    if any(marker and marker in text for marker in markers) or _ROLE_HEADER.search(text):
        return "template marker or role header"
    if sum(ch.isprintable() or ch in "\n\t" for ch in text) < len(text):
        return "unprintable characters"
    if sum(ch.isalpha() for ch in text) < 0.5 * len(text):
        return "mostly not letters"
    if len(words) >= 12 and len(set(words)) < 0.4 * len(words):
        return "repetitive"
    return None


@torch.inference_mode()
def self_queries(model: Any, tokenizer: Any, settings: MagpieSettings, log: Callable[[str], None] = print,
                 rounds_done: list[dict[str, Any]] | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[str], dict[str, int]]:
    """Up to ``settings.count`` distinct, filtered user queries sampled from ``model``, and the refusal counts.

    Round r samples with seed ``settings.seed + r``, so ``rounds_done`` (the rows ``on_round`` was given by an
    interrupted run: round, kept queries, refusals) are taken as they are and sampling goes on after them.
    """
    queries: list[str] = []
    refused: Counter[str] = Counter()
    for row in rounds_done or []:
        queries.extend(row["kept"])
        refused.update(row["refused"])
    seen = {duplicate_key(query, settings.duplicate_prefix_words) for query in queries}
    markers = template_markers(tokenizer)
    for round_index in range(len(rounds_done or []), settings.max_rounds):
        if len(queries) >= settings.count:
            break
        openers = round_openers(settings, round_index)
        kept: list[str] = []
        refusals: Counter[str] = Counter()
        for opener, (written, ended) in zip(openers, sampled_user_turns(model, tokenizer, openers, settings,
                                                                         settings.seed + round_index)):
            text = (opener + written).strip() if opener else written.strip()
            reason = query_problem(text, ended, settings, markers)
            key = duplicate_key(written if opener else text, settings.duplicate_prefix_words)
            if reason is None and key in seen:
                reason = "near-duplicate"
            if reason is not None:
                refusals[reason] += 1
                continue
            seen.add(key)
            kept.append(text)
        queries.extend(kept)
        refused.update(refusals)
        if on_round is not None:
            on_round({"round": round_index, "kept": kept, "refused": dict(refusals)})
        log(f"magpie round {round_index + 1}: {len(queries)} of {settings.count} queries kept")
    return queries[:settings.count], refused


@torch.inference_mode()
def sampled_user_turns(model: Any, tokenizer: Any, openers: list[str], settings: MagpieSettings,
                       seed: int) -> list[tuple[str, bool]]:
    """For each opener, the rest of a user turn that ``model`` writes after the template's user prefix and the
    opener (sampled with ``seed``; the global RNG is left as it was), and whether the turn ended."""
    stop = end_of_turn_id(tokenizer)
    device = next(model.parameters()).device
    batch = left_padded(tokenizer, [user_prefix(tokenizer) + opener for opener in openers]).to(device)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        out = model.generate(**batch, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                             max_new_tokens=settings.max_query_tokens, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop)
    finally:
        torch.random.set_rng_state(generator_state)
    turns = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ended = stop in row
        turns.append((tokenizer.decode(row[:row.index(stop)] if ended else row, skip_special_tokens=True), ended))
    return turns


def template_markers(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's multi-character special tokens (a query holding one is refused)."""
    return tuple(token for token in tokenizer.all_special_tokens if len(token) > 1)


def passage_problem(text: str, settings: MagpieSettings) -> str | None:
    """Why a written passage (its whole sentences, ``whole_sentences``) is refused, or ``None``."""
    if len(_WORD.findall(text.lower())) < settings.min_passage_words:
        return "passage too short"
    return query_problem(text, True, replace(settings, max_words=10 ** 6))


def whole_sentences(text: str, ended: bool) -> str:
    """``text`` up to its last sentence end when it was cut (``ended`` false), else all of it."""
    text = text.strip()
    if ended:
        return text
    cut = max(text.rfind(mark) for mark in (". ", ".\n", "! ", "? ", "!\n", "?\n"))
    return text[:cut + 1] if cut > 0 else (text if text.endswith((".", "!", "?")) else "")


def passage_task_queries(model: Any, tokenizer: Any, settings: MagpieSettings, passages: list[str],
                         batches_done: list[dict[str, Any]] | None = None,
                         on_batch: Callable[[dict[str, Any]], None] | None = None
                         ) -> tuple[list[str], dict[str, int]]:
    """One user turn per passage: passage i set in ``settings.passage_tasks[i % len]``; where the task ends in an open
    field, ``model`` writes the rest (sampled in batches seeded from ``settings.seed``, filtered like a query),
    and the refusal counts. ``batches_done``: the rows ``on_batch`` was given by an interrupted run."""
    queries: list[str] = []
    refused: Counter[str] = Counter()
    for row in batches_done or []:
        queries.extend(row["kept"])
        refused.update(row["refused"])
    open_rules = replace(settings, min_words=2)
    markers = template_markers(tokenizer)
    for start in range(len(batches_done or []) * settings.batch_size, len(passages), settings.batch_size):
        tasks = [settings.passage_tasks[index % len(settings.passage_tasks)].format(passage=passages[index])
                 for index in range(start, min(start + settings.batch_size, len(passages)))]
        open_rows = [index for index, task in enumerate(tasks) if task.endswith(OPEN_FIELD_ENDS)]
        written = dict(zip(open_rows, sampled_user_turns(model, tokenizer, [tasks[i] for i in open_rows], settings,
                                                         settings.seed + 100_000 + start))) if open_rows else {}
        kept: list[str] = []
        refusals: Counter[str] = Counter()
        for index, task in enumerate(tasks):
            if index in written:
                rest, ended = written[index]
                reason = query_problem(rest.strip(), ended, open_rules, markers)
                if reason is not None:
                    refusals[reason] += 1
                    continue
                task = task + (" " if not rest.startswith((" ", "\n")) else "") + rest.rstrip()
            kept.append(task)
        queries.extend(kept)
        refused.update(refusals)
        if on_batch is not None:
            on_batch({"start": start, "kept": kept, "refused": dict(refusals)})
    return queries, refused


def round_openers(settings: MagpieSettings, round_index: int) -> list[str]:
    """The opener of each row of round ``round_index`` (all empty for plain Magpie); rows rotate over the openers,
    and each round starts one opener further on, so every opener is sampled alike."""
    if not settings.openers:
        return [""] * settings.batch_size
    count = len(settings.openers)
    first = round_index * settings.batch_size
    return [settings.openers[(first + row) % count] for row in range(settings.batch_size)]


def left_padded(tokenizer: Any, texts: list[str]) -> Any:
    """``texts`` tokenised as one batch, padded on the left (what ``generate()`` continues from)."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad


def generation_copy(model: Any, dtype: str) -> Any:
    """``model`` itself when it already has ``dtype``, else an evaluation copy cast to it (the original is kept)."""
    wanted = getattr(torch, dtype)
    if next(model.parameters()).dtype == wanted:
        return model
    return copy.deepcopy(model).to(wanted).eval()
