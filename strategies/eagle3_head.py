"""The EAGLE-3 draft head (Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test", 2025).

The head reads a fusion of low-, middle- and high-layer target features: the target's hidden states entering
three of its layers (Hugging Face ``output_hidden_states`` indices), concatenated and projected by ``fc`` (3h -> h,
no bias). The paper names the three levels, not their indices; by default they are the reference code's, layers 2,
L // 2 and L - 3 (``feature_layers``), and a head trained on others records them in its ``config.json`` under
``eagle_aux_hidden_state_layer_ids``, the key vLLM reads (``head_feature_layers``). Its one decoder layer takes
[norm(embedding of the next token); norm(feature)] (2h) into attention, keeps the feature alone on the residual
path, and returns a hidden state h whose ``lm_head(norm(h))`` drafts the token after next. Drafting deeper, the head
feeds itself its own h (already h wide, so ``fc`` is skipped), never a predicted target feature: there is no
feature regression.

The head has its own ``lm_head`` over a draft vocabulary (the ``draft_vocab`` most frequent tokens of its training
text, or the whole vocabulary); its logits are spread to the target's vocabulary, -inf elsewhere, so the target
verifies over its full vocabulary and decoding stays lossless. The embedding is the target's, frozen and not saved.

The reference layout loads and saves as is: ``config.json`` (a one-layer Llama config plus ``draft_vocab_size``)
and ``model.safetensors`` (or ``pytorch_model.bin``) with ``fc.weight``, ``midlayer.self_attn.{q,k,v,o}_proj``,
``midlayer.mlp.{gate,up,down}_proj``, ``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}``,
``norm.weight``, ``lm_head.weight`` and, for a cut vocabulary, ``d2t`` (target id = draft id + d2t) and ``t2d``;
``eagle_aux_hidden_state_layer_ids`` in the config, where present, names the fused layers.
A published config without RoPE settings gets Llama's default base, as the reference's head does.

The forward signature matches a Hugging Face causal LM's (plus ``features``), so
:class:`harness.core.lm.CausalLM` gives the head its KV cache, tree masks and timing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb, repeat_kv)

from harness.core.lm import CausalLM, scatter_subset
from strategies.eagle_head import HeadOutput, head_config

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
METRICS = "metrics.json"
LAYER_IDS_KEY = "eagle_aux_hidden_state_layer_ids"


def feature_layers(layers: int) -> tuple[int, int, int]:
    """The ``output_hidden_states`` indices of the low, middle and high features of an ``layers``-layer target:
    the states entering layers 2, L // 2 and L - 3 (clamped to the target for very shallow ones)."""
    return min(2, layers), layers // 2, max(layers - 3, 0)


def layer_ids_problem(ids: Any, layers: int | None = None) -> str | None:
    """Why ``ids`` cannot name the fused low, middle and high features (of an ``layers``-layer target, when
    given), or None: three increasing layer indices, each below the target's layer count."""
    if not isinstance(ids, (list, tuple)) or len(ids) != 3 or not all(
            isinstance(index, int) and not isinstance(index, bool) for index in ids):
        return f"expected three layer indices (low, middle, high), got {ids!r}"
    if not 0 <= ids[0] < ids[1] < ids[2]:
        return f"expected increasing indices from 0, got {list(ids)}"
    if layers is not None and ids[2] >= layers:
        return f"the target has {layers} layers, so each index must be below {layers}, got {list(ids)}"
    return None


def head_feature_layers(config: Any, layers: int) -> tuple[int, int, int]:
    """The fused layers of a head with ``config`` over an ``layers``-layer target: those its config names
    (``eagle_aux_hidden_state_layer_ids``), else the reference's default (``feature_layers``)."""
    ids = getattr(config, LAYER_IDS_KEY, None)
    if not ids:
        return feature_layers(layers)
    problem = layer_ids_problem(list(ids), layers)
    if problem:
        raise ValueError(f"EAGLE-3 head config {LAYER_IDS_KEY}: {problem}")
    return tuple(ids)


def eagle3_config(target_config: Any, draft_vocab: int = 0, intermediate_size: int | None = None,
                  layer_ids: tuple[int, ...] = ()) -> LlamaConfig:
    """A one-layer Llama config for a head over ``target_config`` (its RoPE settings copied), with
    ``draft_vocab_size`` (0: the target's vocabulary) and, when given, the fused ``layer_ids``."""
    config = head_config(target_config, intermediate_size)
    config.draft_vocab_size = int(draft_vocab or target_config.vocab_size)
    if layer_ids:
        setattr(config, LAYER_IDS_KEY, list(layer_ids))
    return config


class Eagle3Attention(nn.Module):
    """Attention whose queries, keys and values read the 2h-wide [embedding; feature] input."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.heads
        self.q_proj = nn.Linear(2 * hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries ``[b, heads, t, d]`` and keys, and values ``[b, kv_heads, t, d]``."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``o_proj`` of softmax(q kᵀ / √d + mask) v (``mask`` additive, broadcast to ``[b, heads, t, keys]``)."""
        groups = self.heads // self.kv_heads
        scores = q @ repeat_kv(k, groups).transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ repeat_kv(v, groups)
        return self.o_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))


class Eagle3Layer(nn.Module):
    """The draft layer: attention over [input_layernorm(embedding); hidden_norm(feature)], the feature alone on the
    residual path, then a SwiGLU MLP."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Eagle3Attention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)

    def forward(self, embedded: torch.Tensor, feature: torch.Tensor,
                attention: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The layer's output h; ``attention`` maps the 2h input to the attention output (cached or unrolled)."""
        fused = torch.cat([self.input_layernorm(embedded), self.hidden_norm(feature)], dim=-1)
        hidden = feature + attention(fused)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(nn.Module):
    """``fc`` (3h -> h) + the draft layer + its own norm and ``lm_head`` over the draft vocabulary, over the frozen
    embedding of the target."""

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Module, draft_ids: list[int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = None
        hidden = config.hidden_size
        vocab = int(config.vocab_size)
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        draft_vocab = len(draft_ids) if draft_ids else vocab
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.rotary = LlamaRotaryEmbedding(config)
        self.embed_tokens = embed_tokens
        for parameter in self.embed_tokens.parameters():
            parameter.requires_grad_(False)
        if draft_ids and draft_vocab < vocab:
            ids = torch.tensor(sorted(draft_ids), dtype=torch.long)
            self.register_buffer("d2t", ids - torch.arange(draft_vocab))
            self.register_buffer("t2d", torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True))
        else:
            self.d2t = None
            self.t2d = None

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """The target id of each draft-vocabulary entry (None: the draft vocabulary is the target's)."""
        return None if self.d2t is None else self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's own weights under the reference layout's names (no embedding, no RoPE buffers)."""
        return {name: tensor for name, tensor in self.state_dict().items()
                if not name.startswith(("embed_tokens.", "rotary."))}

    def own_parameters(self) -> int:
        """Parameters the head adds to the target."""
        return sum(tensor.numel() for name, tensor in self.head_state().items() if name not in ("d2t", "t2d"))

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The layer's feature input: ``fc`` of the target's 3h fused features, or the head's own h as it is."""
        features = features.to(self.fc.weight.dtype)
        return self.fc(features) if features.shape[-1] == self.fc.in_features else features

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        compute_logits: bool = True,
        logits_to_keep: int = 0,
    ) -> HeadOutput:
        """For each (feature, next token) pair: the head's h and (unless not asked) the logits of the token after
        next, for every position or the last ``logits_to_keep``. ``attention_mask`` is additive ``[1, 1, new,
        cached + new]``; without one the new tokens attend causally."""
        feature = self.fuse(features)
        embedded = self.embed_tokens(input_ids).to(feature.dtype)
        length = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device)[None]
        cos, sin = self.rotary(feature, position_ids)
        if attention_mask is None:
            allowed = torch.ones(length, past + length, dtype=torch.bool, device=feature.device).tril(past)
            attention_mask = torch.zeros(allowed.shape, dtype=feature.dtype, device=feature.device)
            attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(feature.dtype).min)[None, None]
        attn = self.midlayer.self_attn

        def cached_attention(fused: torch.Tensor) -> torch.Tensor:
            q, k, v = attn.project(fused, cos, sin)
            if cache is not None and use_cache:
                k, v = cache.update(k, v, 0)
            return attn.attend(q, k, v, attention_mask.to(q.dtype))

        hidden = self.midlayer(embedded, feature, cached_attention)
        scored = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return HeadOutput(logits=self.logits(scored) if compute_logits else None, hidden_states=(hidden,))

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary: ``lm_head(norm(h))``."""
        return self.lm_head(self.norm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary: the draft vocabulary's, -inf elsewhere."""
        logits = self.draft_logits(hidden)
        ids = self.draft_ids
        return logits if ids is None else scatter_subset(logits, ids, int(self.config.vocab_size))


def save_eagle3(head: Eagle3Head, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``head`` in the reference layout (``config.json`` + ``model.safetensors``); ``extra`` goes to
    ``metrics.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.head_state().items()}
    state = {name: tensor if tensor.dtype in (torch.bool, torch.long) else tensor.float()
             for name, tensor in state.items()}
    save_file(state, str(directory / WEIGHTS[0]))
    config = head.config.to_dict()
    config["architectures"] = ["LlamaForCausalLMEagle3"]
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    if extra:
        (directory / METRICS).write_text(json.dumps(extra, indent=2))


def load_eagle3(directory: Path, target_model: nn.Module) -> Eagle3Head:
    """A saved or published EAGLE-3 head on ``target_model``'s device and dtype, over its embedding."""
    directory = Path(directory)
    path = next((directory / name for name in WEIGHTS if (directory / name).is_file()), None)
    if not (directory / CONFIG).is_file() or path is None:
        raise FileNotFoundError(f"{directory} holds no EAGLE-3 head: expected {CONFIG} and {' or '.join(WEIGHTS)}")
    raw = json.loads((directory / CONFIG).read_text())
    config = LlamaConfig.from_dict({key: value for key, value in raw.items() if key != "architectures"})
    config.num_hidden_layers = 1
    state = load_file(str(path)) if path.suffix == ".safetensors" else \
        torch.load(str(path), map_location="cpu", weights_only=True)
    if config.hidden_size != target_model.config.hidden_size or config.vocab_size != target_model.config.vocab_size:
        raise ValueError(f"EAGLE-3 head in {directory} is for hidden size {config.hidden_size} / vocabulary "
                         f"{config.vocab_size}, not this target's {target_model.config.hidden_size} / "
                         f"{target_model.config.vocab_size}")
    head_feature_layers(config, int(target_model.config.num_hidden_layers))  # refuses ids this target lacks
    draft_ids = None
    if "d2t" in state:
        draft_ids = (state["d2t"] + torch.arange(len(state["d2t"]))).tolist()
    head = Eagle3Head(config, target_model.get_input_embeddings(), draft_ids)
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith(("embed_tokens.", "rotary."))]
    if missing or unexpected:
        raise ValueError(f"EAGLE-3 head in {directory} does not match: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    parameter = next(target_model.parameters())
    head = head.to(device=parameter.device)
    for name, tensor in head.named_parameters():
        if not name.startswith("embed_tokens."):
            tensor.data = tensor.data.to(parameter.dtype)
    return head.eval()


def load_eagle3_lm(directory: Path, target: CausalLM) -> CausalLM:
    """The head in ``directory`` as a ``CausalLM`` over ``target``, ready to draft (its cost-model size: its own
    weights)."""
    head = load_eagle3(directory, target.model)
    return CausalLM(head, name="eagle3-head", num_parameters=head.own_parameters())
