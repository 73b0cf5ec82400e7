"""``StaticCausalLM``: ``CausalLM`` on a preallocated KV cache, with each decode width replayed as a CUDA graph.

A decode forward of a small model on a GPU is host-bound: one token of a
SmolLM2-135M-shaped model launches over a thousand kernels, and Python spends
longer queuing them than the GPU spends running them. Like vLLM and SGLang,
this wrapper captures one CUDA graph per forward shape (number of new tokens,
which hidden states are returned, which extra inputs are fed) and replays it,
so a forward costs one launch.

What a graph needs, and how the wrapper provides it:

- **Fixed addresses.** The KV cache is preallocated (``SlotCache``, ``capacity``
  positions per layer); every input of a captured forward (token ids, position
  ids, the ``[1, 1, new, capacity]`` additive attention mask, the positions the
  new keys and values are written to, extra inputs such as EAGLE's features) is
  copied into that graph's own buffers before it is replayed.
- **Lengths on the host.** The cached length is a Python integer, so cropping
  after a rejection is a length update (the stale positions are masked and later
  overwritten) and nothing reads the device to learn it.
- **Growth.** A sequence that outgrows the cache moves to one of twice the
  capacity, and the graphs are captured again for it.

Prefills (one per prompt, of varying length) run eagerly on the same cache.
Without CUDA (``graphs=False``) every forward runs eagerly on the static cache,
which is how the CPU tests check that the static path decodes exactly what the
dynamic one does. Forward times are read from CUDA events, resolved when the
statistics are read, so timing adds no host synchronisation to a step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from harness.core.lm import CausalLM, ForwardStats, HiddenStates, StepOutput, additive_mask, select_hidden

INITIAL_CAPACITY = 512
"""Positions a new static cache holds; it doubles when a sequence needs more."""


@dataclass
class SlotLayer:
    """One layer's preallocated keys and values, ``[batch, heads, capacity, head_dim]`` each (allocated on first
    write, with the shapes, dtype and device of what is written)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    is_initialized: bool = False

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros((batch, heads, capacity, key_states.shape[-1]))
        self.values = value_states.new_zeros((batch, heads, capacity, value_states.shape[-1]))
        self.is_initialized = True


class SlotCache(Cache):
    """A KV cache of fixed ``capacity`` whose writes go to the positions held in ``slots`` (a device tensor the
    owner fills before each forward) and whose length is a host integer. Attention reads every position; the
    caller's attention mask hides those beyond the sequence."""

    def __init__(self, capacity: int, slots: torch.Tensor) -> None:
        super().__init__(layers=[])
        self.capacity = capacity
        self.slots = slots
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values at ``slots[:new]`` of layer ``layer_idx``; return the whole layer."""
        while len(self.layers) <= layer_idx:
            self.layers.append(SlotLayer())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.allocate(key_states, value_states, self.capacity)
        where = self.slots[:key_states.shape[-2]]
        layer.keys.index_copy_(2, where, key_states)
        layer.values.index_copy_(2, where, value_states)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop that many), as ``DynamicCache.crop`` does."""
        self.length = max(0, self.length + max_length if max_length < 0 else min(max_length, self.length))

    def keep(self, positions: torch.Tensor) -> None:
        """Move the cached ``positions`` (ascending) to the front, in order, and make them the whole sequence."""
        count = int(positions.numel())
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[:, :, :count] = layer.keys.index_select(2, positions)
                layer.values[:, :, :count] = layer.values.index_select(2, positions)
        self.length = count

    def grown(self, capacity: int) -> "SlotCache":
        """A cache of ``capacity`` positions holding this one's sequence."""
        bigger = SlotCache(capacity, self.slots)
        for layer in self.layers:
            copy = SlotLayer()
            if layer.is_initialized:
                copy.allocate(layer.keys, layer.values, capacity)
                copy.keys[:, :, :self.length] = layer.keys[:, :, :self.length]
                copy.values[:, :, :self.length] = layer.values[:, :, :self.length]
            bigger.layers.append(copy)
        bigger.length = self.length
        return bigger


@dataclass
class CapturedForward:
    """One captured forward shape: its input buffers, its graph (None where forwards run eagerly) and the output
    tensors the graph writes."""

    inputs: dict[str, torch.Tensor]
    graph: Any = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class StaticState:
    """Everything a sequence keeps on the static path: the cache, the captured forwards for it, and the buffer of
    write positions they read."""

    cache: SlotCache
    slots: torch.Tensor
    columns: torch.Tensor  # 0, 1, ..., capacity - 1: the causal mask is computed from it and ``slots``
    forwards: dict[tuple, CapturedForward] = field(default_factory=dict)


class StaticCausalLM(CausalLM):
    """A ``CausalLM`` on a preallocated KV cache; decode forwards replay CUDA graphs when ``graphs`` (default: on
    CUDA). Decodes exactly what ``CausalLM`` decodes from the same model (the tests check it in float32)."""

    def __init__(self, model: torch.nn.Module, name: str, num_parameters: int | None = None,
                 vocab_subset: list[int] | None = None, capacity: int = INITIAL_CAPACITY,
                 graphs: bool | None = None) -> None:
        super().__init__(model, name, num_parameters=num_parameters, vocab_subset=vocab_subset)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"{name}: CUDA graphs need a CUDA device, the model is on {self.device}")
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.state = self._new_state(capacity)
        self.started = False
        self.pending: list[tuple[bool, Any, Any, int]] = []  # (prefill, start event, end event, tokens)
        self.spare_events: list[tuple[Any, Any]] = []  # event pairs already read, for reuse
        self.captures = 0

    # ------------------------------------------------------------------ state

    def _new_state(self, capacity: int) -> StaticState:
        slots = torch.zeros(capacity, dtype=torch.long, device=self.device)
        return StaticState(cache=SlotCache(capacity, slots), slots=slots,
                           columns=torch.arange(capacity, device=self.device))

    @property
    def cache(self) -> SlotCache | None:
        return self.state.cache if self.started else None

    @cache.setter
    def cache(self, value: Any) -> None:
        if value is None:  # CausalLM.__init__ and reset(): no sequence
            self.started = False
        elif value is not self.state.cache:
            raise TypeError(f"{self.name}: the static path keeps its own cache")

    @property
    def stats(self) -> ForwardStats:
        self._resolve_timings()
        return self._stats

    @stats.setter
    def stats(self, value: ForwardStats) -> None:
        self._resolve_timings()
        self._stats = value

    @property
    def length(self) -> int:
        return self.state.cache.length if self.started else 0

    @property
    def capacity(self) -> int:
        return self.state.cache.capacity

    def crop(self, length: int) -> None:
        if self.started:
            if length > self.state.cache.length:
                raise ValueError(f"cannot crop a cache of {self.state.cache.length} positions to {length}")
            self.state.cache.length = length
        self.last_logits = None

    @torch.inference_mode()
    def keep(self, positions: list[int] | torch.Tensor) -> None:
        self.state.cache.keep(torch.as_tensor(positions, dtype=torch.long, device=self.device))
        self.last_logits = None

    @torch.inference_mode()
    def prefill(self, ids: list[int] | torch.Tensor, output_hidden_states: HiddenStates = False,
                extra_inputs: dict[str, torch.Tensor] | None = None, all_logits: bool = False) -> StepOutput:
        self.started = True
        self.state.cache.length = 0
        return self._forward(ids, prefill=True, output_hidden_states=output_hidden_states, extra_inputs=extra_inputs,
                             last_logits_only=not all_logits)

    @torch.inference_mode()
    def time_steps(self, widths: list[int], context: int = 8, repeats: int = 5) -> list[float]:
        """As ``CausalLM.time_steps``, on a cache (and graphs) of the probe's own."""
        saved = (self.state, self.started, self.last_logits)
        probe = getattr(self, "_probe_state", None) or self._new_state(INITIAL_CAPACITY)
        self.state = probe
        try:
            return self._timed_widths(widths, context, repeats)
        finally:
            self._probe_state = self.state
            self.state, self.started, self.last_logits = saved

    def _timed_widths(self, widths: list[int], context: int, repeats: int) -> list[float]:
        saved_stats = self.stats
        self.stats = ForwardStats()
        try:
            ids = [index % self.vocab_size for index in range(context + max(widths))]
            self.prefill(ids[:context])
            times: list[list[float]] = [[] for _ in widths]
            for _ in range(repeats):
                for index, width in enumerate(widths):
                    before = self.stats.decode_seconds
                    self._forward(ids[context:context + width], prefill=False)
                    times[index].append(self.stats.decode_seconds - before)
                    self.crop(context)
            return [statistics.median(samples) for samples in times]
        finally:
            self.stats = saved_stats

    # ------------------------------------------------------------------ forward passes

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
        new = input_ids.shape[1]
        if new == 0:
            raise ValueError(f"{self.name}: forward pass with no tokens")
        past = self.state.cache.length
        if past + new > self.capacity:
            self._grow(past + new)
        cache = self.state.cache
        inputs = {"input_ids": input_ids,
                  **{name: value.to(self.device)[None] for name, value in (extra_inputs or {}).items()}}
        if attention_mask is not None or position_ids is not None:  # a tree: its own mask and positions
            if position_ids is None:
                position_ids = torch.arange(past, past + new, device=self.device)
            allowed = torch.zeros((new, self.capacity), dtype=torch.bool, device=self.device)
            if attention_mask is None:
                allowed[:, :past + new] = torch.ones((new, past + new), dtype=torch.bool, device=self.device).tril(past)
            else:
                allowed[:, :past + new] = attention_mask.to(self.device, torch.bool)
            inputs.update(position_ids=position_ids.reshape(1, -1).to(self.device),
                          attention_mask=additive_mask(allowed, self.dtype))
        started, ended = self._clock_start()
        torch.arange(past, past + new, out=self.state.slots[:new])
        if prefill or not self.graphs:
            logits, hidden = self._run(inputs, output_hidden_states, last_logits_only)
        else:
            logits, hidden = self._replay(inputs, output_hidden_states)
        cache.length = past + new
        self._clock_stop(prefill, started, ended, new)
        self.last_logits = logits[-1]
        return StepOutput(logits=logits, hidden_states=hidden)

    def _run(self, inputs: dict[str, torch.Tensor], hidden: HiddenStates,
             last_logits_only: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of ``inputs`` on the static cache: float32 logits and the hidden states asked for. Without
        positions and a mask in ``inputs`` the new tokens are causal after the cached ones, and both are computed
        here from the write positions (inside the graph, when captured)."""
        arguments = dict(inputs)
        if "attention_mask" not in arguments:
            slots = self.state.slots[:inputs["input_ids"].shape[1]]
            allowed = self.state.columns[None, :] <= slots[:, None]
            arguments.update(position_ids=slots[None], attention_mask=additive_mask(allowed, self.dtype))
        if self.subset is not None:  # a draft cut to a vocabulary subset: its body, then the subset's rows
            states = self.subset.body(use_cache=True, **arguments,
                                      **{self.subset.cache_argument: self.state.cache}).last_hidden_state
            logits = self.subset.logits(states[0, -1:] if last_logits_only else states[0])
            return logits, states[0] if hidden else None
        if last_logits_only and self.keeps_logits:
            arguments["logits_to_keep"] = 1
        out = self.model(output_hidden_states=bool(hidden), use_cache=True, **arguments,
                         **{self.cache_argument: self.state.cache})
        logits = out.logits[0, -1:].float() if last_logits_only else out.logits[0].float()
        states = select_hidden(out.hidden_states, hidden)
        return logits, None if states is None else states[0]

    def _replay(self, inputs: dict[str, torch.Tensor],
                hidden: HiddenStates) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward of ``inputs`` by its shape's CUDA graph (captured on first use); outputs are copies, so a
        later replay does not overwrite what a strategy still holds."""
        key = (hidden, inputs["input_ids"].shape[1], *inputs)  # the other shapes follow from the width
        captured = self.state.forwards.get(key)
        if captured is None:
            captured = self._capture(inputs, hidden)
            self.state.forwards[key] = captured
        else:
            for name, value in inputs.items():
                captured.inputs[name].copy_(value)
            captured.graph.replay()
        return captured.logits.clone(), None if captured.hidden is None else captured.hidden.clone()

    def _capture(self, inputs: dict[str, torch.Tensor], hidden: HiddenStates) -> CapturedForward:
        """Capture the forward of ``inputs``' shape: run it eagerly on a side stream (which also does this step's
        work: it writes the new keys and values and gives the outputs), then record it into a graph."""
        buffers = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(buffers, hidden, last_logits_only=False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, states = self._run(buffers, hidden, last_logits_only=False)
        graph.replay()  # the capture only recorded; this step's forward runs now
        self.captures += 1
        return CapturedForward(inputs=buffers, graph=graph, logits=logits, hidden=states)

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        fresh = self._new_state(capacity)
        fresh.cache = self.state.cache.grown(capacity)
        fresh.cache.slots = fresh.slots
        self.state = fresh  # the graphs read the old buffers: capture again

    # ------------------------------------------------------------------ timing

    def _clock_start(self) -> tuple[Any, Any]:
        if self.device.type != "cuda":
            return self.clock(), None
        if self.spare_events:
            started, ended = self.spare_events.pop()
        else:
            started, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started.record()
        return started, ended

    def _clock_stop(self, prefill: bool, started: Any, ended: Any, tokens: int) -> None:
        if ended is None:
            self._stats.count(prefill, self.clock() - started, tokens)
            return
        ended.record()
        self.pending.append((prefill, started, ended, tokens))

    def _resolve_timings(self) -> None:
        pending, self.pending = getattr(self, "pending", []), []
        for prefill, started, ended, tokens in pending:
            ended.synchronize()
            self._stats.count(prefill, started.elapsed_time(ended) / 1e3, tokens)
            self.spare_events.append((started, ended))


def compiled(lm: CausalLM, capacity: int = INITIAL_CAPACITY) -> StaticCausalLM:
    """``lm``'s model on the static path (graphs on CUDA), timed by the same clock; the model is shared."""
    subset = None if lm.subset is None else lm.subset.ids.tolist()
    static = StaticCausalLM(lm.model, lm.name, num_parameters=lm.num_parameters, vocab_subset=subset,
                            capacity=capacity)
    static.clock = lm.clock
    return static
