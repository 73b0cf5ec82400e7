"""D-LLM's token-adaptive layer skipping (Jiang et al. 2024) on a Hugging Face Llama-family model.

From layer ``start`` on, every decoder layer has an execution router: Linear(h -> r), RMSNorm, SiLU,
Linear(r -> 2), read on the hidden state entering the layer; index 1 means execute, 0 skip. A skipped token
passes the layer unchanged, and its key and value at that layer are excluded from later tokens' attention at
that layer (D-LLM's eviction mask): its cache slot holds zeros and a flag that masks it out.

``SkippingLM`` is a ``CausalLM`` that runs the decoder layer by layer with this rule. At inference a layer is
skipped for a forward pass only when its router says skip for every token in the pass (SpaDec's rule: then the
layer costs nothing; otherwise it runs for all of them, as D-LLM's batched inference does). ``route_tokens``
gives the training form: every token decides on its own, by straight-through Gumbel-softmax, the layer's output
is mixed by the decisions and the eviction mask applies per token.

``forward_split`` is SpaDec's verification pass: the first ``split`` layers over every draft-tree node, then a
``select`` callback (the acceptance predictor) picks the nodes that go through the remaining layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from harness.core.lm import CausalLM, StepOutput, additive_mask, cache_argument, synchronize


class ExecutionRouter(torch.nn.Module):
    """One layer's router: Linear(hidden -> rank), RMSNorm, SiLU, Linear(rank -> 2) = (skip, execute) logits."""

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, rank)
        self.norm = torch.nn.RMSNorm(rank)
        self.up = torch.nn.Linear(rank, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(torch.nn.functional.silu(self.norm(self.down(hidden))))


class LayerRouters(torch.nn.Module):
    """The routers of layers ``start`` .. ``layers - 1``; layers before ``start`` always execute."""

    def __init__(self, hidden_size: int, layers: int, start: int, rank: int = 64) -> None:
        super().__init__()
        if not 0 <= start < layers:
            raise ValueError(f"router start layer {start} is outside 0..{layers - 1}")
        self.start, self.layers = start, layers
        self.routers = torch.nn.ModuleList(ExecutionRouter(hidden_size, rank) for _ in range(start, layers))

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """(skip, execute) logits ``[..., 2]`` of ``layer``'s router, or None for a layer before ``start``."""
        if layer < self.start:
            return None
        return self.routers[layer - self.start](hidden)

    def executes(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Hard per-token decisions ``[...]`` (True = execute) at inference."""
        logits = self.logits(layer, hidden)
        if logits is None:
            return torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
        return logits[..., 1] >= logits[..., 0]


@dataclass
class SkipStats:
    """Token-layer executions of the routed layers: how many there were and how many were skipped."""

    routed: int = 0
    skipped: int = 0
    skipped_parameters: int = 0  # Σ over forward passes of the parameters of the layers the pass skipped

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.routed if self.routed else 0.0


class SkippingLM(CausalLM):
    """A ``CausalLM`` whose decoder layers from ``routers.start`` on are skipped per forward pass when every token
    in the pass says skip. ``force_execute`` turns skipping off (then it computes exactly what the dense model
    does). Per layer, ``flags`` marks the cached positions whose key and value exist (False: evicted)."""

    def __init__(self, model: torch.nn.Module, name: str, routers: LayerRouters, force_execute: bool = False,
                 num_parameters: int | None = None) -> None:
        super().__init__(model, name, num_parameters=num_parameters)
        self.routers = routers.to(self.device, self.dtype).eval()
        self.force_execute = force_execute
        self.body = model.get_decoder()
        self.layer_cache_argument = cache_argument(self.body.layers[0])
        self.flags: list[torch.Tensor] = []
        self.skips = SkipStats()
        self.layer_parameters = [sum(p.numel() for p in layer.parameters()) for layer in self.body.layers]

    # ------------------------------------------------------------------ cache bookkeeping

    def reset(self) -> None:
        super().reset()
        self.flags = []

    def crop(self, length: int) -> None:
        super().crop(length)
        self.flags = [flags[:length] for flags in self.flags]

    def keep(self, positions: list[int] | torch.Tensor) -> None:
        super().keep(positions)
        index = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        self.flags = [flags.index_select(0, index) for flags in self.flags]

    def time_steps(self, widths: list[int], context: int = 8, repeats: int = 5) -> list[float]:
        saved = self.flags, self.skips
        try:
            self.flags, self.skips = [], SkipStats()  # the scratch sequence's own, as its cache is
            return super().time_steps(widths, context, repeats)
        finally:
            self.flags, self.skips = saved

    # ------------------------------------------------------------------ forward passes

    def _forward(self, ids, prefill: bool, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                 extra_inputs=None, last_logits_only: bool = False) -> StepOutput:
        if extra_inputs:
            raise ValueError(f"{self.name}: a layer-skipping model takes no extra inputs")
        from transformers import DynamicCache  # lazy: transformers, as in CausalLM.prefill

        if prefill:
            self.cache, self.flags = DynamicCache(), []
        started = self._start()
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        hidden, _ = self._layers(input_ids, attention_mask, position_ids, range(self.layer_count))
        return self._finish(hidden, prefill, started, len(input_ids), output_hidden_states, last_logits_only)

    @torch.inference_mode()
    def forward_split(self, ids: list[int], attention_mask: torch.Tensor, position_ids: torch.Tensor, split: int,
                      select: Callable[[torch.Tensor], list[int]]) -> tuple[StepOutput, list[int], torch.Tensor]:
        """SpaDec's pass: layers ``0 .. split-1`` over all ``ids`` (tree mask ``attention_mask``, ``[n, past + n]``),
        then only the nodes ``select(hidden entering layer split)`` returns (ascending, each one's tree ancestors
        among them) through the remaining layers. Returns their logits and final hidden states, the selected
        nodes, and the hidden states entering layer ``split`` of every node. The cache keeps one slot per node in
        every layer; a node left out of the deep layers is evicted there."""
        started = self._start()
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        past = self.length
        hidden, positions = self._layers(input_ids, attention_mask, position_ids, range(split))
        entering = hidden.clone()
        chosen = list(select(entering))
        index = torch.as_tensor(chosen, dtype=torch.long, device=self.device)
        sub_mask = torch.cat([attention_mask[index, :past], attention_mask[index][:, past + index]], dim=1)
        deep, _ = self._layers(input_ids[index], sub_mask, positions[index], range(split, self.layer_count),
                               hidden=hidden[index], slots=(index, len(ids)))
        out = self._finish(deep, False, started, len(chosen), True, False)
        return out, chosen, entering

    @property
    def layer_count(self) -> int:
        return len(self.body.layers)

    def _start(self) -> float:
        synchronize(self.device)
        return self.clock()

    def _finish(self, hidden: torch.Tensor, prefill: bool, started: float, tokens: int, output_hidden_states: bool,
                last_logits_only: bool) -> StepOutput:
        normed = self.body.norm(hidden)
        rows = normed[-1:] if last_logits_only else normed
        logits = self.model.get_output_embeddings()(rows).float()
        synchronize(self.device)
        self.stats.count(prefill, self.clock() - started, tokens)
        self.last_logits = logits[-1]
        return StepOutput(logits=logits, hidden_states=normed if output_hidden_states else None)

    def _layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                layers: range, hidden: torch.Tensor | None = None,
                slots: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``layers`` on the pass's tokens; returns the hidden states leaving the last of them and the
        positions. ``slots`` = (the tokens' slots among ``count`` new cache slots, ``count``) when the pass
        covers only some of the new slots (the rest are evicted in these layers)."""
        count = len(input_ids)
        width = count if slots is None else slots[1]  # new cache slots in these layers
        past = self._past_before(layers.start)
        positions = position_ids if position_ids is not None else torch.arange(past, past + count, device=self.device)
        positions = positions.to(self.device).reshape(-1)
        allowed = attention_mask.to(self.device).bool() if attention_mask is not None else _causal(count, past,
                                                                                                  self.device)
        if hidden is None:
            hidden = self.body.embed_tokens(input_ids[None])[0]
        embeddings = self.body.rotary_emb(hidden[None], position_ids=positions[None])
        cache = {self.layer_cache_argument: self.cache}
        for layer in layers:
            while len(self.flags) <= layer:
                self.flags.append(torch.zeros(0, dtype=torch.bool, device=self.device))
            runs = self.force_execute or bool(self.routers.executes(layer, hidden).any())
            if layer >= self.routers.start:
                self.skips.routed += count
                self.skips.skipped += 0 if runs else count
                self.skips.skipped_parameters += 0 if runs else self.layer_parameters[layer]
            new_flags = torch.zeros(width, dtype=torch.bool, device=self.device)
            if runs:
                visible = allowed & torch.cat([self.flags[layer][:past],
                                               torch.ones(count, dtype=torch.bool, device=self.device)])[None]
                mask = additive_mask(visible, self.dtype)
                hidden = self.body.layers[layer](hidden[None], attention_mask=mask, position_embeddings=embeddings,
                                                 position_ids=positions[None], use_cache=True, **cache)[0]
                if slots is not None:
                    self._spread(layer, slots)
                new_flags[slots[0] if slots is not None else slice(None)] = True
            else:
                self._append_evicted(layer, width)
            self.flags[layer] = torch.cat([self.flags[layer][:past], new_flags])
        return hidden, positions

    def _past_before(self, layer: int) -> int:
        """Positions ``layer`` has cached before this pass (in a split pass the shallow layers have appended theirs
        before the deep ones run, so each range counts from its own first layer)."""
        entries = getattr(self.cache, "layers", [])
        if len(entries) <= layer or not getattr(entries[layer], "is_initialized", True):
            return 0
        keys = getattr(entries[layer], "keys", None)
        return 0 if keys is None or keys.dim() < 2 else int(keys.shape[-2])

    def _append_evicted(self, layer: int, count: int) -> None:
        """Zero key/value slots for ``count`` tokens that skipped ``layer`` (their flags mask them out)."""
        attention = self.body.layers[layer].self_attn
        heads = attention.config.num_key_value_heads
        shape = (1, heads, count, attention.head_dim)
        zeros = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache.update(zeros, zeros.clone(), layer)

    def _spread(self, layer: int, slots: tuple[torch.Tensor, int]) -> None:
        """After a deep layer ran on some of a pass's ``count`` new slots, lay its new keys and values out over all
        ``count`` slots (zeros, evicted, in the others), so every layer keeps one slot per node."""
        index, count = slots
        entry = self.cache.layers[layer]
        taken = len(index)
        for name in ("keys", "values"):
            tensor = getattr(entry, name)
            head, tail = tensor[..., :-taken, :], tensor[..., -taken:, :]
            full = torch.zeros((*tail.shape[:-2], count, tail.shape[-1]), dtype=tail.dtype, device=tail.device)
            full[..., index, :] = tail
            setattr(entry, name, torch.cat([head, full], dim=-2))


def _causal(count: int, past: int, device: torch.device) -> torch.Tensor:
    """``[count, past + count]`` booleans: each new token sees the cache and the new tokens up to itself."""
    new = torch.ones(count, count, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(count, past, dtype=torch.bool, device=device), new], dim=1)


def route_tokens(model: torch.nn.Module, routers: LayerRouters, input_ids: torch.Tensor, tau: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """D-LLM's training forward over ``input_ids`` ``[batch, tokens]`` (no cache): from ``routers.start`` on, each
    token decides per layer by straight-through Gumbel-softmax (temperature ``tau``) whether to execute it; the
    layer's output is mixed by the decision, and a token that skips a layer is masked out of later tokens' attention
    at that layer. Returns the logits ``[batch, tokens, vocab]`` and the activation ratio (executed / routed
    token-layers, differentiable)."""
    body = model.get_decoder()
    batch, count = input_ids.shape
    device = input_ids.device
    hidden = body.embed_tokens(input_ids)
    positions = torch.arange(count, device=device)[None].expand(batch, -1)
    embeddings = body.rotary_emb(hidden, position_ids=positions)
    causal = torch.ones(count, count, dtype=torch.bool, device=device).tril()
    eye = torch.eye(count, dtype=torch.bool, device=device)
    executed = []
    for layer_index, layer in enumerate(body.layers):
        logits = routers.logits(layer_index, hidden)
        if logits is None:
            mask = additive_mask(causal, hidden.dtype).expand(batch, 1, count, count)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
            continue
        noise = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator, device="cpu").to(device)
                                      .clamp(1e-9, 1 - 1e-9)))
        soft = torch.softmax((logits.float() + noise) / tau, dim=-1)
        hard = torch.nn.functional.one_hot(soft.argmax(-1), 2).to(soft.dtype)
        decision = (hard - soft.detach() + soft)[..., 1].to(hidden.dtype)  # straight-through: hard forward, soft grad
        visible = causal[None] & ((hard[..., 1] > 0.5)[:, None, :] | eye[None])
        out = layer(hidden, attention_mask=additive_mask(visible, hidden.dtype), position_embeddings=embeddings, position_ids=positions)
        hidden = decision[..., None] * out + (1 - decision[..., None]) * hidden
        executed.append(decision.float().mean())
    logits = model.get_output_embeddings()(body.norm(hidden)).float()
    ratio = torch.stack(executed).mean() if executed else torch.ones((), device=device)
    return logits, ratio
