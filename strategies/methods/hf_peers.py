"""Hugging Face's own decoding as peer strategies: ``generate()`` plain, assisted and with prompt lookup.

These run transformers' ``model.generate`` on the target's Hugging Face model
(never through ``CausalLM``, whose cache stays untouched), so that a report
shows transformers' implementations beside specsweep's own methods:

- ``hf_greedy``: plain ``generate`` (greedy, or multinomial sampling when the
  run samples);
- ``hf_assisted``: assisted generation with a sweep draft as
  ``assistant_model`` (Leviathan-style speculative sampling when sampling),
  and transformers' universal assisted decoding when the draft's tokenizer
  differs from the target's;
- ``hf_prompt_lookup``: prompt lookup decoding (``prompt_lookup_num_tokens``).

Every call gets an explicit ``GenerationConfig``; while it runs, the models'
own ``generation_config`` is swapped for a neutral one, so that a checkpoint's
defaults (``top_k``, ``repetition_penalty``, ...) never change the
distribution and the assistant's adaptive settings (``num_assistant_tokens``
under the ``heuristic`` schedule) start from the configured values on every
prompt. Forward passes bypass ``CausalLM``'s counters, so they are counted
with forward hooks on the Hugging Face modules; the first target call is the
prefill (which, in assisted generation, already verifies the first draft).
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from harness.core.errors import ConfigError
from harness.core.lm import CausalLM, ForwardStats, synchronize
from strategies.base import ModelSet, Step, Strategy, StrategyParams, Trace, truncate
from strategies.registry import register
from strategies.sampling import Sampling

SCHEDULES = ("constant", "heuristic", "heuristic_transient")


# ----------------------------------------------------------------------------- forward counting


@dataclass
class ForwardCall:
    """One forward call of a Hugging Face module: tokens fed, positions cached before it, synchronised seconds."""

    length: int
    start: int | None
    seconds: float


class ForwardCounter:
    """Counts the forward calls of one module (and their seconds) while the ``with`` block runs.

    The hooks are removed when the block ends, also on error. Time is taken
    with ``time.perf_counter()`` after ``harness.core.lm.synchronize``.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self.calls: list[ForwardCall] = []
        self._pending: tuple[int, int | None, float] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "ForwardCounter":
        self._handles = [
            self.module.register_forward_pre_hook(self._before, with_kwargs=True),
            self.module.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = None

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            length = int(ids.shape[1]) if ids is not None else 0
        else:
            length = int(ids.shape[-1])
        start = cached_length(kwargs)
        synchronize(self.device)
        self._pending = (length, start, time.perf_counter())

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        synchronize(self.device)
        if self._pending is None:
            return
        length, start, began = self._pending
        self._pending = None
        self.calls.append(ForwardCall(length=length, start=start, seconds=time.perf_counter() - began))

    def stats(self, parameters: int) -> dict[str, float]:
        """The calls counted as ``CausalLM.stats`` counts its own (the first call is the prefill), plus
        ``parameters``."""
        counted = ForwardStats()
        for index, call in enumerate(self.calls):
            counted.count(prefill=index == 0, seconds=call.seconds, tokens=call.length)
        return {**counted.as_dict(), "parameters": parameters}


def cached_length(kwargs: dict[str, Any]) -> int | None:
    """Positions already cached when a forward call starts: from its cache, else its first position id."""
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    for name in ("position_ids", "cache_position"):
        positions = kwargs.get(name)
        if isinstance(positions, torch.Tensor) and positions.numel():
            return int(positions.reshape(-1)[0])
    return None


def steps_from_calls(calls: list[ForwardCall], prompt_length: int, new_tokens: int) -> list[Step]:
    """One ``Step`` per target call, so that Σ(accepted + 1) over the steps equals ``new_tokens``.

    The prefill's step drafted whatever it scored past the prompt (assisted
    generation verifies its first draft in the prefill); every later call
    drafted all its tokens but the first (the previous step's correction or
    bonus token). A step's accepted count follows from how far the sequence
    grew before the next call (the cached length + 1 then), clipped to
    [0, drafted]; the last step ends at ``new_tokens`` (cut at EOS or
    ``max_new_tokens``). Without cached lengths, tokens are assigned to the
    earliest steps first.
    """
    if not calls:
        return []
    drafted = [max(0, calls[0].length - prompt_length)] + [max(0, call.length - 1) for call in calls[1:]]
    count = len(calls)
    before: list[int | None] = [0] + [None if call.start is None else call.start + 1 - prompt_length
                                      for call in calls[1:]]
    if all(value is not None for value in before):
        bounds = [*before, new_tokens]
        return [Step(drafted=drafted[i], accepted=min(drafted[i], max(0, bounds[i + 1] - bounds[i] - 1)))
                for i in range(count)]
    steps, remaining = [], new_tokens
    for index, amount in enumerate(drafted):
        accepted = min(amount, max(0, remaining - (count - index)))
        steps.append(Step(drafted=amount, accepted=accepted))
        remaining -= accepted + 1
    return steps


# ----------------------------------------------------------------------------- generation settings


def generation_config_for(target: CausalLM, max_new_tokens: int, sampling: Sampling, pad_token_id: int | None,
                          **extra: Any):
    """The explicit ``GenerationConfig`` of one call: length, EOS, padding and an unmodified distribution.

    transformers fills every ``None`` field from the model's generation config
    and then from its global defaults (``top_k`` 50), so under sampling the
    warpers are switched off with neutral values (``top_k=0``, ``top_p=1.0``).
    """
    from transformers import GenerationConfig

    eos = sorted(target.eos_token_id)
    settings: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=not sampling.greedy,
        temperature=None,
        top_k=None,
        top_p=None,
        eos_token_id=eos or None,
        pad_token_id=pad_token_id,
        use_cache=True,
        return_dict_in_generate=False,
        disable_compile=True,
    )
    if not sampling.greedy:
        settings.update(temperature=float(sampling.temperature), top_k=0, top_p=1.0, typical_p=1.0)
    settings.update(extra)
    return GenerationConfig(**settings)


def neutral_config(model: torch.nn.Module, eos: list[int], pad_token_id: int | None, **extra: Any):
    """A generation config holding only the model's special tokens (and ``extra``), to stand in for its own."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    return GenerationConfig(bos_token_id=getattr(own, "bos_token_id", None), eos_token_id=eos or None,
                            pad_token_id=pad_token_id, **extra)


@contextmanager
def swapped_generation_config(model: torch.nn.Module, config: Any) -> Iterator[None]:
    """Give ``model`` the generation config ``config`` for the block; restore its own afterwards, also on error."""
    own = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = own


def seed_global_rng(sampling: Sampling) -> None:
    """Seed torch's global RNG (which ``generate`` samples from) from the run's generator, when sampling."""
    if sampling.greedy or sampling.generator is None:
        return
    generator = sampling.generator
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    torch.manual_seed(seed)


def tokenizers_differ(first: Any, second: Any) -> bool:
    """Whether two tokenizers map text to different ids: their vocabularies (token → id) differ."""
    if first is second:
        return False
    return first.get_vocab() != second.get_vocab()


def ordered_vocabulary(tokenizer: Any) -> Any:
    """Make ``tokenizer.get_vocab()`` list tokens by id (a fast tokenizer's order changes from process to process)."""
    unordered = tokenizer.get_vocab
    tokenizer.get_vocab = lambda: dict(sorted(unordered().items(), key=lambda item: item[1]))
    return tokenizer


# ----------------------------------------------------------------------------- strategies


class HFPeer(Strategy):
    """Shared machinery of the Hugging Face peers: run ``target.model.generate`` and account for it as a Trace."""

    def pad_token_id(self) -> int | None:
        """The target tokenizer's pad id, or the first EOS id."""
        tokenizer = self.models.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is not None:
            return int(pad)
        eos = sorted(self.models.target.eos_token_id)
        return eos[0] if eos else None

    def run_generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                     assistant: torch.nn.Module | None = None, assistant_settings: dict[str, Any] | None = None,
                     assistant_parameters: int = 0, generate_kwargs: dict[str, Any] | None = None,
                     **config: Any) -> Trace:
        """Call ``generate`` once with hooks counting the forward passes; return the Trace.

        ``config`` goes into the call's ``GenerationConfig``; ``assistant`` (a
        Hugging Face model) gets a neutral generation config with
        ``assistant_settings`` for the call; ``generate_kwargs`` are further
        ``generate`` arguments (tokenizers for universal assisted decoding).
        """
        target = self.models.target
        eos = sorted(target.eos_token_id)
        pad = self.pad_token_id()
        generation_config = generation_config_for(target, max_new_tokens, sampling, pad, **config)
        input_ids = torch.as_tensor([list(prompt_ids)], dtype=torch.long, device=target.device)
        kwargs: dict[str, Any] = dict(generate_kwargs or {})
        # An explicit mask: transformers would otherwise infer one from pad ids, which a prompt may contain.
        kwargs["attention_mask"] = torch.ones_like(input_ids)
        seed_global_rng(sampling)
        with ExitStack() as stack:
            stack.enter_context(swapped_generation_config(target.model, neutral_config(target.model, eos, pad)))
            target_counter = stack.enter_context(ForwardCounter(target.model, target.device))
            draft_counter = None
            if assistant is not None:
                stack.enter_context(swapped_generation_config(
                    assistant, neutral_config(assistant, eos, pad, **(assistant_settings or {}))))
                draft_counter = stack.enter_context(ForwardCounter(assistant, next(assistant.parameters()).device))
                kwargs["assistant_model"] = assistant
            with torch.inference_mode():
                output = target.model.generate(input_ids, generation_config=generation_config, **kwargs)
        new = output[0, input_ids.shape[1]:].tolist()
        tokens = truncate(new, max_new_tokens, target.eos_token_id)
        forward = {"target": target_counter.stats(target.num_parameters)}
        if draft_counter is not None:
            forward["draft"] = draft_counter.stats(assistant_parameters)
        steps = steps_from_calls(target_counter.calls, len(prompt_ids), len(tokens))
        return Trace(tokens=tokens, steps=steps, forward=forward, cost_units=self.cost_units(forward))


@dataclass(frozen=True)
class HFGreedyParams(StrategyParams):
    """``compile``: decode on transformers' static cache and let ``generate`` compile the forward
    (``torch.compile``, mode ``reduce-overhead``: CUDA graphs), the fastest ``generate()`` there is to compare a
    compiled run against. transformers compiles on accelerators only; on a CPU the static cache runs eagerly."""

    added_later: ClassVar[tuple[str, ...]] = ("compile",)

    compile: bool = False


@register("hf_greedy")
class HFGreedy(HFPeer):
    """transformers' plain ``generate`` on the target (greedy, or sampling when the run samples)."""

    Params = HFGreedyParams

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        if self.params.compile:
            return self.run_generate(prompt_ids, max_new_tokens, sampling, cache_implementation="static",
                                     disable_compile=False)
        return self.run_generate(prompt_ids, max_new_tokens, sampling)


@dataclass(frozen=True)
class HFAssistedParams(StrategyParams):
    """``draft``: a name from the sweep's ``models.drafts``; the rest are transformers' assistant settings.

    ``num_assistant_tokens`` is the draft length per step, ``schedule``
    transformers' ``num_assistant_tokens_schedule`` and ``confidence_threshold``
    its ``assistant_confidence_threshold`` (the draft stops early below it;
    0 turns that off).
    """

    draft: str
    num_assistant_tokens: int = 20
    schedule: str = "constant"
    confidence_threshold: float = 0.4

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.num_assistant_tokens < 1:
            yield ConfigError(f"{where}.num_assistant_tokens", f"must be >= 1, got {self.num_assistant_tokens}",
                              "draft at least one token per step")
        if self.schedule not in SCHEDULES:
            yield ConfigError(f"{where}.schedule", f"unknown schedule {self.schedule!r}",
                              f"choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            yield ConfigError(f"{where}.confidence_threshold", f"must be in [0, 1], got {self.confidence_threshold}",
                              "0 turns the early stop off")

    def uses_drafts(self) -> list[str]:
        return [self.draft]


@register("hf_assisted")
class HFAssisted(HFPeer):
    """transformers' assisted generation with a sweep draft; universal assisted decoding across tokenizers."""

    Params = HFAssistedParams
    supports_other_tokenizers: ClassVar[bool] = True

    def __init__(self, params: StrategyParams, models: ModelSet) -> None:
        super().__init__(params, models)
        self._tokenizers: tuple[Any, Any] | None | bool = False  # False: not decided yet
        self._private: tuple[torch.nn.Module, Any, Any] | None = None

    def universal_tokenizers(self) -> tuple[Any, Any] | None:
        """The (target, draft) tokenizers for universal assisted decoding, or None when they share token ids.

        transformers takes different model vocabulary sizes to mean different
        tokenizers (and then needs both tokenizers), and refuses an
        ``assistant_tokenizer`` when the sizes are equal; tokenizers that differ
        at equal sizes therefore cannot be run and raise here.
        """
        if self._tokenizers is not False:
            return self._tokenizers
        name = self.params.draft
        draft = self.models.draft(name)
        target_tokenizer = self.models.tokenizer
        draft_tokenizer = getattr(self.models, "draft_tokenizers", {}).get(name)
        sizes_differ = (self.models.target.model.config.get_text_config().vocab_size
                        != draft.model.config.get_text_config().vocab_size)
        known = target_tokenizer is not None and draft_tokenizer is not None
        if sizes_differ:
            if not known:
                raise RuntimeError(f"hf_assisted: draft {name!r} has a vocabulary of another size than the target's; "
                                   "universal assisted decoding needs both tokenizers (ModelSet.tokenizer and "
                                   "ModelSet.draft_tokenizers)")
            self._tokenizers = (target_tokenizer, draft_tokenizer)
        elif known and tokenizers_differ(target_tokenizer, draft_tokenizer):
            raise RuntimeError(f"hf_assisted: draft {name!r} has another tokenizer but a vocabulary of the same size; "
                               "transformers runs universal assisted decoding only between vocabularies of "
                               "different sizes")
        else:
            self._tokenizers = None
        return self._tokenizers

    def private_assistant(self, draft: CausalLM, tokenizers: tuple[Any, Any]) -> tuple[torch.nn.Module, Any, Any]:
        """A private copy of the draft model and both tokenizers for universal speculative *sampling*.

        There transformers prunes the assistant's LM head and input embeddings
        in place and caches that translation by tokenizer objects; copies keep
        the shared draft model (used by other cells) intact. The translation is
        built here, before any seeded call, since pruning draws a fresh
        ``Linear``'s initial weights from the global RNG; and the copies list
        their vocabularies by id, so that it comes out the same in every process.
        """
        if self._private is None:
            from transformers.generation.candidate_generator import AssistantVocabTranslatorCache

            assistant = copy.deepcopy(draft.model)
            target_tokenizer, draft_tokenizer = (ordered_vocabulary(copy.deepcopy(t)) for t in tokenizers)
            AssistantVocabTranslatorCache.get_translator(
                target_tokenizer, draft_tokenizer, self.models.target.model.config.get_text_config().vocab_size,
                assistant_model=assistant, assistant_prune_lm_head=True)
            self._private = (assistant, target_tokenizer, draft_tokenizer)
        return self._private

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        draft = self.models.draft(self.params.draft)
        tokenizers = self.universal_tokenizers()
        assistant, generate_kwargs = draft.model, {}
        if tokenizers is not None:
            if not sampling.greedy:
                assistant, *tokenizers = self.private_assistant(draft, tokenizers)
            generate_kwargs = {"tokenizer": tokenizers[0], "assistant_tokenizer": tokenizers[1]}
        settings = {
            "num_assistant_tokens": self.params.num_assistant_tokens,
            "num_assistant_tokens_schedule": self.params.schedule,
            "assistant_confidence_threshold": self.params.confidence_threshold,
        }
        return self.run_generate(prompt_ids, max_new_tokens, sampling, assistant=assistant,
                                 assistant_settings=settings, assistant_parameters=draft.num_parameters,
                                 generate_kwargs=generate_kwargs, **settings)


@dataclass(frozen=True)
class HFPromptLookupParams(StrategyParams):
    """``num_tokens``: transformers' ``prompt_lookup_num_tokens``; ``max_ngram``: its ``max_matching_ngram_size``."""

    num_tokens: int = 10
    max_ngram: int = 2

    def problems(self, where: str) -> Iterator[ConfigError]:
        if self.num_tokens < 1:
            yield ConfigError(f"{where}.num_tokens", f"must be >= 1, got {self.num_tokens}",
                              "draft at least one token per match")
        if self.max_ngram < 1:
            yield ConfigError(f"{where}.max_ngram", f"must be >= 1, got {self.max_ngram}", "match at least 1-grams")


@register("hf_prompt_lookup")
class HFPromptLookup(HFPeer):
    """transformers' prompt lookup decoding: drafts copied from earlier n-gram matches in the text."""

    Params = HFPromptLookupParams

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        return self.run_generate(prompt_ids, max_new_tokens, sampling,
                                 prompt_lookup_num_tokens=self.params.num_tokens,
                                 max_matching_ngram_size=self.params.max_ngram)
