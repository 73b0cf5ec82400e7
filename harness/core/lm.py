"""``CausalLM``: the one wrapper through which strategies use a Hugging Face causal LM.

It owns a KV cache for a single sequence (batch size 1) and offers the few
operations speculative decoding needs: ``prefill`` a prompt, ``extend`` the
cached sequence with new tokens (optionally with a custom attention mask and
position ids, for tree verification), ``crop`` the cache back after a
rejection, and ``keep`` a subset of cached positions (tree compaction). It
counts forward passes and their (synchronised) time so that every strategy is
measured the same way.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def crop_to(cache, length: int) -> None:
    """Shorten a transformers ``Cache`` to its first ``length`` positions (works on 4.x and 5.x)."""
    extra = cache.get_seq_length() - length
    if extra < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} positions to {length}")
    if extra:
        cache.crop(-extra)


def keep_positions(cache, positions: torch.Tensor) -> None:
    """Keep only the cached positions ``positions`` (in order) in every layer of a ``DynamicCache``."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(-2, positions)
            layer.values = layer.values.index_select(-2, positions)


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` so that host clocks measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ForwardStats:
    """Forward-pass counts and seconds of one model, split into prefill and decode calls."""

    prefill_calls: int = 0
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_calls: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0

    @property
    def calls(self) -> int:
        return self.prefill_calls + self.decode_calls

    def count(self, prefill: bool, seconds: float, tokens: int) -> None:
        """Count one forward pass of ``tokens`` tokens that took ``seconds``, as a prefill or a decode call."""
        if prefill:
            self.prefill_calls += 1
            self.prefill_seconds += seconds
            self.prefill_tokens += tokens
        else:
            self.decode_calls += 1
            self.decode_seconds += seconds
            self.decode_tokens += tokens

    def as_dict(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "prefill_calls": self.prefill_calls,
            "prefill_seconds": self.prefill_seconds,
            "prefill_tokens": self.prefill_tokens,
            "decode_calls": self.decode_calls,
            "decode_seconds": self.decode_seconds,
            "decode_tokens": self.decode_tokens,
        }


HiddenStates = bool | tuple[int, ...]
"""Which hidden states a forward returns: none (False), the last layer's after the final norm (True), or the
concatenation of ``output_hidden_states[i]`` for each named i (EAGLE-3's low, middle and high features)."""


def select_hidden(states: tuple[torch.Tensor, ...], which: HiddenStates) -> torch.Tensor | None:
    """The hidden states ``which`` asks for, from a Hugging Face model's ``hidden_states`` tuple."""
    if not which:
        return None
    if which is True:
        return states[-1]
    return torch.cat([states[index] for index in which], dim=-1)


@dataclass
class StepOutput:
    """What one forward pass returns: logits for each new token, and hidden states if asked for."""

    logits: torch.Tensor  # [new_tokens, vocab], float32
    hidden_states: torch.Tensor | None = None  # [new_tokens, hidden]: the last hidden states (after the final norm),
    # or, when the forward named layers (``HiddenStates``), those layers' states concatenated
    extras: dict = field(default_factory=dict)


class CausalLM:
    """A Hugging Face causal LM with its own KV cache for one sequence."""

    def __init__(self, model: torch.nn.Module, name: str, num_parameters: int | None = None,
                 vocab_subset: list[int] | None = None) -> None:
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.config.vocab_size)
        self.subset: VocabSubset | None = VocabSubset(model, vocab_subset) if vocab_subset else None
        self.num_parameters = num_parameters or _parameters_used(model, self.subset)
        self.eos_token_id = _eos_ids(model)
        self.stats = ForwardStats()
        self.cache = None
        self.last_logits: torch.Tensor | None = None
        self.cache_argument = cache_argument(model)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters  # HF LMs: skip unused rows
        self.clock: Callable[[], float] = time.perf_counter  # what forward timings read (tests inject their own)

    # ------------------------------------------------------------------ state

    @property
    def length(self) -> int:
        """Number of positions held in the KV cache."""
        return 0 if self.cache is None else self.cache.get_seq_length()

    def reset(self) -> None:
        """Drop the cache (start a new sequence); statistics are kept."""
        self.cache = None
        self.last_logits = None

    def reset_stats(self) -> ForwardStats:
        """Return the statistics gathered so far and start counting afresh."""
        stats, self.stats = self.stats, ForwardStats()
        return stats

    def time_single_step(self, context: int = 8, repeats: int = 5) -> float:
        """Median seconds of a 1-token decode forward on a short fixed context (the drift guard's probe). The
        median, not the minimum: load that comes and goes shows in it, where the fastest forward could land in a
        quiet moment (the minimum missed 3 of 12 distorted cells in the shared drift demo)."""
        return self.time_steps([1], context, repeats)[0]

    @torch.inference_mode()
    def time_steps(self, widths: list[int], context: int = 8, repeats: int = 5) -> list[float]:
        """Median seconds of a decode forward of each of ``widths`` tokens after a fixed ``context``-token prefix,
        over ``repeats`` rounds that time every width once (so load that comes and goes spreads over all widths).

        Runs on a cache of its own; the sequence, cache and statistics in use are left as they were.
        """
        from transformers import DynamicCache

        saved = (self.cache, self.last_logits, self.stats)
        try:
            self.cache, self.stats = DynamicCache(), ForwardStats()
            ids = [index % self.vocab_size for index in range(context + max(widths))]
            self._forward(ids[:context], prefill=True, last_logits_only=True)
            times: list[list[float]] = [[] for _ in widths]
            for _ in range(repeats):
                for index, width in enumerate(widths):
                    before = self.stats.decode_seconds
                    self._forward(ids[context:context + width], prefill=False)
                    times[index].append(self.stats.decode_seconds - before)
                    self.crop(context)
            return [statistics.median(samples) for samples in times]
        finally:
            self.cache, self.last_logits, self.stats = saved

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def prefill(self, ids: list[int] | torch.Tensor, output_hidden_states: HiddenStates = False,
                extra_inputs: dict[str, torch.Tensor] | None = None, all_logits: bool = False) -> StepOutput:
        """Start a new sequence with ``ids``; return the logits of its last position (of every one if ``all_logits``).

        ``extra_inputs`` are further per-token model inputs (``[new, ...]``, e.g. an
        EAGLE head's features), passed to the model with a batch axis added.
        Hidden states, when asked for, cover every position.
        """
        from transformers import DynamicCache

        self.cache = DynamicCache()
        return self._forward(ids, prefill=True, output_hidden_states=output_hidden_states, extra_inputs=extra_inputs,
                             last_logits_only=not all_logits)

    @torch.inference_mode()
    def extend(
        self,
        ids: list[int] | torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: HiddenStates = False,
        extra_inputs: dict[str, torch.Tensor] | None = None,
    ) -> StepOutput:
        """Append ``ids`` to the cached sequence; return logits for each of them.

        ``attention_mask`` (``[new, cached + new]`` booleans, True = may attend) and
        ``position_ids`` (``[new]``) replace the causal defaults, for tree verification.
        """
        if self.cache is None:
            raise RuntimeError(f"{self.name}: extend() before prefill()")
        return self._forward(ids, prefill=False, attention_mask=attention_mask, position_ids=position_ids,
                             output_hidden_states=output_hidden_states, extra_inputs=extra_inputs)

    def crop(self, length: int) -> None:
        """Roll the cache back to its first ``length`` positions."""
        if self.cache is not None:
            crop_to(self.cache, length)
        self.last_logits = None

    def keep(self, positions: list[int] | torch.Tensor) -> None:
        """Keep only the cached ``positions`` (ascending), e.g. the accepted path of a verified tree."""
        index = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        keep_positions(self.cache, index)
        self.last_logits = None

    def _forward(
        self,
        ids: list[int] | torch.Tensor,
        prefill: bool,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: HiddenStates = False,
        extra_inputs: dict[str, torch.Tensor] | None = None,
        last_logits_only: bool = False,
    ) -> StepOutput:
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        n_new = input_ids.shape[1]
        if n_new == 0:
            raise ValueError(f"{self.name}: forward pass with no tokens")
        past = self.cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + n_new, device=self.device)
        kwargs = {name: value.to(self.device)[None] for name, value in (extra_inputs or {}).items()}
        if attention_mask is not None:
            kwargs["attention_mask"] = additive_mask(attention_mask, self.dtype)
        synchronize(self.device)
        started = self.clock()
        inputs = {"input_ids": input_ids, "position_ids": position_ids.reshape(1, -1).to(self.device), "use_cache": True,
                  **kwargs}
        if self.subset is not None:
            hidden = self.subset.body(**inputs, **{self.subset.cache_argument: self.cache}).last_hidden_state
            logits = self.subset.logits(hidden[0, -1:] if last_logits_only else hidden[0])
            out = None
        else:
            if last_logits_only and self.keeps_logits:
                inputs["logits_to_keep"] = 1
            out = self.model(output_hidden_states=bool(output_hidden_states), **inputs,
                             **{self.cache_argument: self.cache})
            logits = out.logits[0, -1:].float() if last_logits_only else out.logits[0].float()
        synchronize(self.device)
        self.stats.count(prefill, self.clock() - started, n_new)
        self.last_logits = logits[-1]
        if out is None:
            hidden = hidden[0] if output_hidden_states else None
        else:
            hidden = select_hidden(out.hidden_states, output_hidden_states)
            hidden = None if hidden is None else hidden[0]
        return StepOutput(logits=logits, hidden_states=hidden)


class VocabSubset:
    """A draft's LM head cut to a token subset (FR-Spec, Zhao et al. 2025): logits only for ``ids``, -inf elsewhere.

    Drafting from the subset changes only the draft distribution q; the target
    still verifies over the full vocabulary, so decoding stays lossless.
    """

    def __init__(self, model: torch.nn.Module, ids: list[int]) -> None:
        self.body = model.get_decoder()
        self.cache_argument = cache_argument(self.body)
        head = model.get_output_embeddings()
        self.ids = torch.as_tensor(sorted(set(ids)), dtype=torch.long, device=head.weight.device)
        self.weight = head.weight.detach().index_select(0, self.ids).contiguous()
        self.bias = None if getattr(head, "bias", None) is None else head.bias.detach().index_select(0, self.ids)
        self.vocab_size = head.weight.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits ``[tokens, vocab]`` with only the subset's entries finite."""
        return scatter_subset(torch.nn.functional.linear(hidden, self.weight, self.bias).float(), self.ids,
                              self.vocab_size)


def scatter_subset(part: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over the subset ``ids`` (last axis) spread to the full vocabulary, -inf outside the subset."""
    full = torch.full((*part.shape[:-1], vocab_size), float("-inf"), dtype=part.dtype, device=part.device)
    full[..., ids] = part
    return full


def _parameters_used(model: torch.nn.Module, subset: VocabSubset | None) -> int:
    """Parameters of ``model`` (CS Drafting's cost model), its LM head counted as the subset's rows when cut."""
    total = sum(p.numel() for p in model.parameters())
    if subset is None:
        return total
    return total - model.get_output_embeddings().weight.numel() + subset.weight.numel()


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean ``[new, total]`` (or per-row ``[batch, new, total]``) mask into the ``[1, 1, new, total]``
    (``[batch, 1, new, total]``) additive mask models accept."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed.bool(), torch.finfo(dtype).min)
    mask = mask.unsqueeze(-3)
    return mask if mask.dim() == 4 else mask[None]


def _eos_ids(model: torch.nn.Module) -> frozenset[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
