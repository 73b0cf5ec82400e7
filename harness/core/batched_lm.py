"""``BatchedCausalLM``: one Hugging Face causal LM decoding a batch of sequences of different lengths.

Speculative decoding at batch size B > 1 feeds every row a different number of
tokens per step (a draft, a correction, or nothing once the row is done), and
keeps a different number of them. This wrapper holds one KV cache for the
batch, ``[B, heads, slots, dim]`` per layer, plus a boolean map of which cache
slots hold each row's committed tokens:

* ``prefill`` left-pads the prompts; the padding slots are never valid.
* ``extend`` appends one block of ``width`` slots (the longest row's input);
  each row's tokens attend to its own valid slots and, inside the block, to
  their predecessors: a chain, or a row's tree (``parents``, EAGLE-2's
  verification), or, for a draft tree grown level by level, further slots
  named per token (``attend``) in blocks that were never committed
  (``commit=False``). Positions are per row, counted in valid slots plus the
  token's depth in the block, so a row's rotary positions are those it would
  have at batch size 1.
* ``crop`` keeps each row's accepted prefix and ``keep_block`` a row's
  accepted tree path in the last block: rejected positions are masked out,
  never recomputed. ``compact`` gathers each row's valid slots to the right
  end of a shorter cache once holes pile up.

Forward passes are counted and timed like :class:`harness.core.lm.CausalLM`'s,
once per batched pass.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from harness.core.lm import (CausalLM, ForwardStats, HiddenStates, additive_mask, cache_argument, select_hidden,
                             synchronize)
from harness.core.tree import ancestor_mask, node_depths


@dataclass
class BatchStep:
    """One batched forward: ``logits[b, i]`` after row b's i-th new token (rows padded to one width), and the
    last hidden states likewise when asked for. ``counts[b]`` is how many of row b's entries are real."""

    logits: torch.Tensor  # [batch, width, vocab], float32
    counts: list[int]
    hidden_states: torch.Tensor | None = None  # [batch, width, hidden]

    def row(self, index: int) -> torch.Tensor:
        """Row ``index``'s real logits, ``[counts[index], vocab]``."""
        return self.logits[index, : self.counts[index]]

    def row_hidden(self, index: int) -> torch.Tensor:
        """Row ``index``'s real hidden states, ``[counts[index], hidden]``."""
        if self.hidden_states is None:
            raise ValueError("this forward pass was run without hidden states")
        return self.hidden_states[index, : self.counts[index]]


@dataclass
class BatchPrefill:
    """A batched prefill: the logits after each row's prompt, ``[batch, vocab]``, and, when asked for, each row's
    last hidden states, ``[len(prompt), hidden]`` per row."""

    last_logits: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None


ExtraInputs = dict[str, list[torch.Tensor | None]]  # per-token model inputs by name: one [tokens, ...] tensor per row


def pad_rows(values: list[torch.Tensor | None], counts: list[int], width: int, left: bool) -> torch.Tensor:
    """Stack per-row ``[count, ...]`` tensors into ``[batch, width, ...]``, zero-padded on the left or the right."""
    sample = next((value for value in values if value is not None), None)
    if sample is None:
        raise ValueError("extra inputs need a tensor for at least one row")
    out = torch.zeros(len(values), width, *sample.shape[1:], dtype=sample.dtype, device=sample.device)
    for index, (value, count) in enumerate(zip(values, counts)):
        if count:
            if left:
                out[index, width - count:] = value[:count]
            else:
                out[index, :count] = value[:count]
    return out


class BatchedCausalLM:
    """A causal LM with one KV cache for a batch of sequences, each with its own length."""

    def __init__(self, model: torch.nn.Module, name: str, num_parameters: int, eos_token_id: frozenset[int],
                 pad_token_id: int = 0, compact_after: int = 64) -> None:
        self.model = model.eval()
        self.name = name
        self.num_parameters = num_parameters
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.compact_after = compact_after  # holes a row may carry before ``compact`` gathers the cache
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.config.vocab_size)
        self.cache_argument = cache_argument(model)
        self.stats = ForwardStats()
        self.clock: Callable[[], float] = time.perf_counter
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.forward_kwargs: dict[str, Any] = {}  # further arguments of every forward (peft's per-row adapter_names)
        self.cache = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # [batch, slots]
        self.block: tuple[int, int] = (0, 0)  # the last extend's (first slot, width)
        self.last_logits: torch.Tensor | None = None  # [batch, vocab]: after each row's last valid token

    @classmethod
    def of(cls, lm: CausalLM, compact_after: int = 64) -> "BatchedCausalLM":
        """The batched twin of ``lm``: the same model, name and parameter count, a cache and statistics of its own.
        A ``CausalLM`` with a cut vocabulary (FR-Spec) has no batched twin yet."""
        if lm.subset is not None:
            raise ValueError(f"{lm.name}: a vocabulary subset is not supported at batch size > 1")
        pad = getattr(lm.model.config, "pad_token_id", None)
        return cls(lm.model, lm.name, lm.num_parameters, lm.eos_token_id, pad if isinstance(pad, int) else 0,
                   compact_after)

    # ------------------------------------------------------------------ state

    @property
    def batch_size(self) -> int:
        return int(self.valid.shape[0])

    @property
    def lengths(self) -> list[int]:
        """Committed tokens held per row (its valid cache slots)."""
        return self.valid.sum(-1).tolist()

    @property
    def slots(self) -> int:
        """Cache slots per row, valid or not."""
        return int(self.valid.shape[1])

    def reset_stats(self) -> ForwardStats:
        """Return the statistics gathered so far and start counting afresh."""
        stats, self.stats = self.stats, ForwardStats()
        return stats

    @torch.inference_mode()
    def time_steps(self, widths: list[int], batch_size: int, context: int = 8, repeats: int = 5) -> list[float]:
        """Median seconds of a batched decode forward of ``batch_size`` rows of each of ``widths`` tokens after a
        fixed ``context``-token prefix, over ``repeats`` rounds that time every width once (as
        ``CausalLM.time_steps`` does at batch size 1). The batch, cache and statistics in use are left as they were.
        """
        saved = (self.cache, self.valid, self.block, self.last_logits, self.stats)
        try:
            self.stats = ForwardStats()
            ids = [index % self.vocab_size for index in range(context + max(widths))]
            self.prefill([ids[:context]] * batch_size)
            times: list[list[float]] = [[] for _ in widths]
            for _ in range(repeats):
                for index, width in enumerate(widths):
                    before = self.stats.decode_seconds
                    self.extend([ids[context:context + width]] * batch_size)
                    times[index].append(self.stats.decode_seconds - before)
                    self.crop([context] * batch_size)
            return [statistics.median(samples) for samples in times]
        finally:
            self.cache, self.valid, self.block, self.last_logits, self.stats = saved

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def prefill(self, rows: list[list[int]], output_hidden_states: HiddenStates = False,
                extra_inputs: ExtraInputs | None = None) -> BatchPrefill:
        """Start a batch with the prompts ``rows`` (each non-empty); return the logits after each, and each row's
        hidden states when asked for (the last layer's, or named layers' concatenated, as ``CausalLM`` gives them).
        ``extra_inputs`` hold one ``[len(row), ...]`` tensor per row."""
        from transformers import DynamicCache

        if not rows or any(not row for row in rows):
            raise ValueError(f"{self.name}: prefill needs at least one row and a token in every row")
        counts = [len(row) for row in rows]
        width = max(counts)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for index, row in enumerate(rows):
            ids[index, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            valid[index, width - len(row):] = True
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        allowed = torch.tril(torch.ones(width, width, dtype=torch.bool))[None] & valid[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool)[None]  # a padding query sees itself (no empty softmax row)
        extras = {name: pad_rows(values, counts, width, left=True) for name, values in (extra_inputs or {}).items()}
        self.cache = DynamicCache()
        self.valid = torch.zeros(len(rows), 0, dtype=torch.bool, device=self.device)
        out = self._forward(ids, positions, allowed, prefill=True, last_only=True, tokens=int(valid.sum()),
                            output_hidden_states=output_hidden_states, extras=extras)
        self.valid = valid.to(self.device)
        self.block = (0, width)
        self.last_logits = out.logits[:, -1]
        hidden = None
        if output_hidden_states:
            hidden = [out.hidden_states[index, width - count:] for index, count in enumerate(counts)]
        return BatchPrefill(last_logits=self.last_logits, hidden_states=hidden)

    @torch.inference_mode()
    def extend(self, rows: list[list[int]], output_hidden_states: HiddenStates = False,
               extra_inputs: ExtraInputs | None = None, parents: list[list[int] | None] | None = None,
               attend: list[list[list[int]]] | None = None, depths: list[list[int]] | None = None,
               commit: bool = True) -> BatchStep:
        """Append each row's tokens (a row may have none) in one forward pass and return their logits.

        Each token attends to its row's valid slots and, inside the new block, to its predecessors, or, where
        ``parents[b]`` is given, to its ancestors in row b's tree (node 0 the root, parents before children).
        ``attend[b][i]`` names further slots token i of row b sees (a draft tree's earlier levels). Its position
        is the row's valid slots plus its depth in the block, or ``depths[b][i]`` when given. With ``commit`` the
        new tokens are kept until ``crop`` or ``keep_block`` says otherwise; without, they are never valid (a
        draft's scratch entries, seen only through ``attend``).
        """
        if self.cache is None or len(rows) != self.batch_size:
            raise ValueError(f"{self.name}: extend() needs a prefill of {len(rows)} rows first")
        counts = [len(row) for row in rows]
        width = max(1, *counts)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        block = torch.zeros(len(rows), width, width, dtype=torch.bool)
        offsets = torch.zeros(len(rows), width, dtype=torch.long)
        for index, row in enumerate(rows):
            count = counts[index]
            if not count:
                continue
            ids[index, :count] = torch.as_tensor(row, dtype=torch.long)
            tree = parents[index] if parents is not None else None
            if tree is None:
                block[index, :count, :count] = torch.tril(torch.ones(count, count, dtype=torch.bool))
            else:
                block[index, :count, :count] = ancestor_mask(tree)
            if depths is not None:
                offsets[index, :count] = torch.as_tensor(depths[index], dtype=torch.long)
            else:
                offsets[index, :count] = torch.arange(count) if tree is None else torch.tensor(node_depths(tree))
        block |= torch.eye(width, dtype=torch.bool)[None]  # padding queries see themselves
        past = self.valid.cpu()
        seen = past[:, None, :].expand(-1, width, -1)
        if attend is not None:
            seen = seen.clone()
            for index, per_token in enumerate(attend):
                for token, slots in enumerate(per_token):
                    seen[index, token, slots] = True
        allowed = torch.cat([seen, block], dim=-1)
        positions = past.sum(-1, keepdim=True) + offsets
        extras = {name: pad_rows(values, counts, width, left=False) for name, values in (extra_inputs or {}).items()}
        out = self._forward(ids, positions, allowed, prefill=False, output_hidden_states=output_hidden_states,
                            counts=counts, extras=extras)
        real = torch.arange(width)[None, :] < torch.as_tensor(counts)[:, None]
        self.block = (self.slots, width)
        self.valid = torch.cat([self.valid, (real if commit else torch.zeros_like(real)).to(self.device)], dim=-1)
        has_new = [index for index, count in enumerate(counts) if count]
        if commit and has_new:
            self.last_logits = self.last_logits.clone()
            for index in has_new:
                self.last_logits[index] = out.logits[index, counts[index] - 1]
        return out

    def crop(self, lengths: list[int]) -> None:
        """Keep each row's first ``lengths[b]`` committed tokens (a row never grows by it); ``last_logits`` is then
        stale for any row that dropped a token."""
        if len(lengths) != self.batch_size:
            raise ValueError(f"{self.name}: crop() needs one length per row, got {len(lengths)} for {self.batch_size}")
        limit = torch.as_tensor(lengths, dtype=torch.long, device=self.device)[:, None]
        self.valid = self.valid & (self.valid.long().cumsum(-1) <= limit)
        self.compact()

    def keep_block(self, kept: list[list[int]]) -> None:
        """Keep, of the last ``extend``'s block, only the entries ``kept[b]`` of row b (indices into the row's
        tokens: a chain's accepted prefix, or a tree's accepted path); ``last_logits`` is then stale for a row that
        dropped its last token."""
        if len(kept) != self.batch_size:
            raise ValueError(f"{self.name}: keep_block() needs one list per row, got {len(kept)} for {self.batch_size}")
        start, width = self.block
        if start + width != self.slots:
            raise ValueError(f"{self.name}: keep_block() must follow the extend() whose block it keeps")
        mask = torch.zeros(self.batch_size, width, dtype=torch.bool)
        for index, entries in enumerate(kept):
            mask[index, entries] = True
        self.valid = self.valid.clone()
        self.valid[:, start:] &= mask.to(self.device)
        self.compact()

    def compact(self, force: bool = False) -> None:
        """Gather each row's valid slots to the right end of a cache as long as the longest row, once some row
        carries more than ``compact_after`` holes (always when ``force``)."""
        lengths = self.valid.sum(-1)
        longest = int(lengths.max()) if lengths.numel() else 0
        if self.cache is None or (not force and self.slots - int(lengths.min()) <= self.compact_after):
            return
        index = torch.zeros(self.batch_size, longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(self.batch_size, longest, dtype=torch.bool, device=self.device)
        for row in range(self.batch_size):
            slots = self.valid[row].nonzero().flatten()
            if len(slots):
                index[row, longest - len(slots):] = slots
                valid[row, longest - len(slots):] = True
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.numel():
                gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
                layer.keys = layer.keys.gather(2, gather)
                layer.values = layer.values.gather(2, gather)
        self.valid = valid
        self.block = (self.slots, 0)  # the last block's slots moved: nothing is left for keep_block

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, prefill: bool,
                 output_hidden_states: HiddenStates = False, last_only: bool = False,
                 counts: list[int] | None = None, tokens: int = 0,
                 extras: dict[str, torch.Tensor] | None = None) -> BatchStep:
        inputs = {"input_ids": ids.to(self.device), "position_ids": positions.to(self.device),
                  "attention_mask": additive_mask(allowed.to(self.device), self.dtype), "use_cache": True,
                  **{name: value.to(self.device) for name, value in (extras or {}).items()}, **self.forward_kwargs}
        if last_only and self.keeps_logits:
            inputs["logits_to_keep"] = 1
        synchronize(self.device)
        started = self.clock()
        out = self.model(output_hidden_states=bool(output_hidden_states), **inputs, **{self.cache_argument: self.cache})
        synchronize(self.device)
        self.stats.count(prefill, self.clock() - started, int(sum(counts)) if counts is not None else tokens)
        counts = counts if counts is not None else [int(ids.shape[1])] * int(ids.shape[0])
        hidden = select_hidden(out.hidden_states, output_hidden_states) if output_hidden_states else None
        logits = out.logits[:, -1:] if last_only else out.logits
        return BatchStep(logits=logits.float(), counts=counts, hidden_states=hidden)
