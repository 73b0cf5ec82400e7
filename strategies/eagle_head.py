"""The EAGLE draft head (Li et al. 2024): feature-level autoregression on top of a frozen target.

Input at position i is the target's feature f_i (its last hidden state, after
the final norm, so that ``lm_head(f_i)`` are its logits) concatenated with the
embedding of token t_{i+1}; ``fc`` maps the pair back to the hidden size and
one Llama decoder layer predicts f_{i+1}, whose ``lm_head`` logits draft
t_{i+2}. The target's embedding and ``lm_head`` are reused frozen, so a saved
head holds only ``fc`` and the decoder layer (safetensors + ``head.json``).

As in the reference code, the decoder layer has no input norm (the fused
input is not normalised) and there is no final norm before ``lm_head``.

A head may draft from a vocabulary subset (FR-Spec: the most frequent tokens of
its training text, saved in ``head.json``); its logits are then computed for
those rows of ``lm_head`` only, -inf elsewhere. The target verifies over the
full vocabulary, so decoding stays lossless.

Published EAGLE-1/2 heads (the reference layout: ``config.json`` plus
``fc.*`` and ``layers.0.*`` weights in ``model.safetensors`` or
``pytorch_model.bin``) load too. The reference feeds ``fc`` with
[embedding; feature], the reverse of this module's order, so its ``fc``
columns are swapped on load.

The forward signature matches a Hugging Face causal LM's (plus ``features``),
so :class:`harness.core.lm.CausalLM` gives the head the same KV-cache handling,
tree masks and timing as any model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.core.lm import CausalLM, cache_argument, scatter_subset

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
PUBLISHED_CONFIG = "config.json"
PUBLISHED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class HeadOutput:
    """Logits over the vocabulary and the predicted features (as ``hidden_states[-1]``)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


def head_config(target_config: Any, intermediate_size: int | None = None):
    """A one-layer Llama config matching ``target_config``'s hidden size, heads, RoPE and vocabulary.

    RoPE settings are copied whole (``rope_parameters`` under transformers 5, else ``rope_theta``), as the
    reference head shares its target's config; an earlier version read only ``rope_theta``, which transformers 5
    no longer has, and so gave heads of targets with another base (SmolLM2: 100,000) the default 10,000.
    """
    from transformers import LlamaConfig

    heads = int(target_config.num_attention_heads)
    rope = getattr(target_config, "rope_parameters", None)  # transformers 5 keeps rope_theta in here
    rope_settings = {"rope_parameters": dict(rope)} if rope else \
        {"rope_theta": float(getattr(target_config, "rope_theta", 10000.0))}
    return LlamaConfig(
        vocab_size=int(target_config.vocab_size),
        hidden_size=int(target_config.hidden_size),
        intermediate_size=int(intermediate_size or target_config.intermediate_size),
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(target_config, "num_key_value_heads", None) or heads),
        max_position_embeddings=int(target_config.max_position_embeddings),
        rms_norm_eps=float(getattr(target_config, "rms_norm_eps", 1e-6)),
        **rope_settings,
        head_dim=int(getattr(target_config, "head_dim", None) or target_config.hidden_size // heads),
        tie_word_embeddings=False,
    )


class EagleHead(nn.Module):
    """``fc(2h -> h)`` + one decoder layer, over the frozen embedding and ``lm_head`` of the target."""

    def __init__(self, config, embed_tokens: nn.Module, lm_head: nn.Module, vocab_subset: list[int] | None = None) -> None:
        from transformers import LlamaModel

        super().__init__()
        self.config = config
        self.generation_config = None
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.decoder = LlamaModel(config)
        self.decoder.embed_tokens = None  # inputs arrive as embeddings
        self.decoder.layers[0].input_layernorm = nn.Identity()
        self.decoder.norm = nn.Identity()
        self.decoder_cache_argument = cache_argument(self.decoder)
        # Frozen, shared with the target; kept out of the saved state (see ``trainable_state``).
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        for module in (self.embed_tokens, self.lm_head):
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.vocab_subset = sorted(set(vocab_subset)) if vocab_subset else None
        self._subset_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, lm_head rows), built lazily

    def subset_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(ids, lm_head rows)`` of the drafting subset, or None when the head drafts from the full vocabulary."""
        if self.vocab_subset is None:
            return None
        weight = self.lm_head.weight
        if self._subset_rows is None or self._subset_rows[1].device != weight.device or \
                self._subset_rows[1].dtype != weight.dtype:
            ids = torch.tensor(self.vocab_subset, dtype=torch.long, device=weight.device)
            self._subset_rows = (ids, weight.detach().index_select(0, ids))
        return self._subset_rows

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The head's own weights (``fc`` and the decoder layer), as saved."""
        return {name: tensor for name, tensor in self.state_dict().items()
                if not name.startswith(("embed_tokens.", "lm_head."))}

    def own_parameters(self) -> int:
        """Parameters the head adds to the target (``fc`` and the decoder layer)."""
        return sum(t.numel() for t in self.trainable_state().values())

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
        """Predict the next features for each (feature, next-token) pair, and (unless not asked) their logits: for
        every position, or for the last ``logits_to_keep`` (as a Hugging Face LM's argument)."""
        embedded = self.embed_tokens(input_ids).to(self.fc.weight.dtype)
        fused = self.fc(torch.cat([features.to(self.fc.weight.dtype), embedded], dim=-1))
        out = self.decoder(inputs_embeds=fused, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=use_cache, **{self.decoder_cache_argument: cache})
        predicted = out.last_hidden_state
        scored = predicted[:, -logits_to_keep:] if logits_to_keep else predicted
        return HeadOutput(logits=self.logits(scored) if compute_logits else None, hidden_states=(predicted,))

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of predicted features: ``lm_head``, or its subset rows with -inf elsewhere."""
        predicted = predicted.to(self.lm_head.weight.dtype)
        rows = self.subset_rows()
        if rows is None:
            return self.lm_head(predicted)
        ids, weight = rows
        return scatter_subset(nn.functional.linear(predicted, weight), ids, self.lm_head.weight.shape[0])


def save_head(head: EagleHead, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the head's own weights (safetensors) and its config to ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in head.trainable_state().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))
    meta = {"config": head.config.to_dict(), "vocab_subset": head.vocab_subset, **(extra or {})}
    (directory / HEAD_CONFIG).write_text(json.dumps(meta, indent=2))


def load_head(directory: Path, target_model: nn.Module) -> EagleHead:
    """Load a saved or published head onto ``target_model``'s device and dtype, sharing its embedding and ``lm_head``."""
    directory = Path(directory)
    if (directory / HEAD_CONFIG).is_file():
        meta = json.loads((directory / HEAD_CONFIG).read_text())
        config_dict, subset = meta["config"], meta.get("vocab_subset")
        from safetensors.torch import load_file

        state = load_file(str(directory / HEAD_WEIGHTS))
    elif (directory / PUBLISHED_CONFIG).is_file():
        config_dict, subset = json.loads((directory / PUBLISHED_CONFIG).read_text()), None
        state = published_state(directory, int(config_dict["hidden_size"]))
    else:
        raise FileNotFoundError(f"{directory} holds no EAGLE head: expected {HEAD_CONFIG} + {HEAD_WEIGHTS} (specsweep) "
                                f"or {PUBLISHED_CONFIG} + {' or '.join(PUBLISHED_WEIGHTS)} (the reference layout)")
    from transformers import LlamaConfig

    config = LlamaConfig.from_dict({key: value for key, value in config_dict.items() if key != "architectures"})
    if config.hidden_size != target_model.config.hidden_size or config.vocab_size != target_model.config.vocab_size:
        raise ValueError(f"head in {directory} was trained for hidden size {config.hidden_size} / vocabulary "
                         f"{config.vocab_size}, not this target's {target_model.config.hidden_size} / "
                         f"{target_model.config.vocab_size}")
    config.num_hidden_layers = 1
    head = EagleHead(config, target_model.get_input_embeddings(), target_model.get_output_embeddings(), subset)
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith(("embed_tokens.", "lm_head."))]
    if missing or unexpected:
        raise ValueError(f"head in {directory} does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    parameter = next(target_model.parameters())
    return head.to(device=parameter.device, dtype=parameter.dtype).eval()


def load_head_lm(directory: Path, target):
    """The head in ``directory`` as a ``CausalLM`` over ``target`` (a ``CausalLM``), ready to draft.

    Its cost-model size is its own weights plus the ``lm_head`` rows it computes.
    """

    head = load_head(directory, target.model)
    rows = head.subset_rows()
    lm_head_parameters = target.model.get_output_embeddings().weight.numel() if rows is None else rows[1].numel()
    return CausalLM(head, name="eagle-head", num_parameters=head.own_parameters() + lm_head_parameters)


def published_state(directory: Path, hidden: int) -> dict[str, torch.Tensor]:
    """A reference-layout EAGLE-1/2 checkpoint's weights renamed to this module's (``fc`` columns swapped)."""
    path = next((directory / name for name in PUBLISHED_WEIGHTS if (directory / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{directory} has {PUBLISHED_CONFIG} but no {' or '.join(PUBLISHED_WEIGHTS)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.startswith("fc."):
            state[name] = torch.cat([tensor[:, hidden:], tensor[:, :hidden]], dim=1) if name == "fc.weight" else tensor
        elif name.startswith("layers.0."):
            state["decoder." + name] = tensor
        elif not name.startswith(("embed_tokens.", "lm_head.")):
            raise ValueError(f"unexpected tensor {name!r} in the published EAGLE head {path}")
    if "fc.bias" not in state:
        state["fc.bias"] = torch.zeros(hidden, dtype=state["fc.weight"].dtype)  # reference heads may have no fc bias
    return state


def save_published(head: EagleHead, directory: Path) -> None:
    """Write ``head`` in the reference layout (``config.json`` + ``model.safetensors``, [embedding; feature] fc)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    hidden = head.config.hidden_size
    state = {}
    for name, tensor in head.trainable_state().items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if name == "fc.weight":
            tensor = torch.cat([tensor[:, hidden:], tensor[:, :hidden]], dim=1)
        state[name.removeprefix("decoder.")] = tensor.contiguous()
    save_file(state, str(directory / PUBLISHED_WEIGHTS[0]))
    (directory / PUBLISHED_CONFIG).write_text(json.dumps(head.config.to_dict(), indent=2))
