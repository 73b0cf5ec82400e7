"""The EAGLE draft head (Li et al. 2024): feature-level autoregression on top of a frozen target.

Input at position i is the target's feature f_i (its last hidden state, after
the final norm, so that ``lm_head(f_i)`` are its logits) concatenated with the
embedding of token t_{i+1}; ``fc`` maps the pair back to the hidden size and
one Llama decoder layer predicts f_{i+1}, whose ``lm_head`` logits draft
t_{i+2}. The target's embedding and ``lm_head`` are reused frozen, so a saved
head holds only ``fc`` and the decoder layer (safetensors + ``head.json``).

As in the reference code, the decoder layer has no input norm (the fused
input is not normalised) and there is no final norm before ``lm_head``.

The forward signature matches a Hugging Face causal LM's (plus ``features``),
so :class:`harness.lm.CausalLM` gives the head the same KV-cache handling,
tree masks and timing as any model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.lm import cache_argument

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


@dataclass
class HeadOutput:
    """Logits over the vocabulary and the predicted features (as ``hidden_states[-1]``)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


def head_config(target_config: Any, intermediate_size: int | None = None):
    """A one-layer Llama config matching ``target_config``'s hidden size, heads, RoPE and vocabulary."""
    from transformers import LlamaConfig

    heads = int(target_config.num_attention_heads)
    return LlamaConfig(
        vocab_size=int(target_config.vocab_size),
        hidden_size=int(target_config.hidden_size),
        intermediate_size=int(intermediate_size or target_config.intermediate_size),
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(target_config, "num_key_value_heads", None) or heads),
        max_position_embeddings=int(target_config.max_position_embeddings),
        rms_norm_eps=float(getattr(target_config, "rms_norm_eps", 1e-6)),
        rope_theta=float(getattr(target_config, "rope_theta", 10000.0)),
        head_dim=int(getattr(target_config, "head_dim", None) or target_config.hidden_size // heads),
        tie_word_embeddings=False,
    )


class EagleHead(nn.Module):
    """``fc(2h -> h)`` + one decoder layer, over the frozen embedding and ``lm_head`` of the target."""

    def __init__(self, config, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
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
    ) -> HeadOutput:
        """Predict the next features for each (feature, next-token) pair, and their logits."""
        embedded = self.embed_tokens(input_ids).to(self.fc.weight.dtype)
        fused = self.fc(torch.cat([features.to(self.fc.weight.dtype), embedded], dim=-1))
        out = self.decoder(inputs_embeds=fused, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=use_cache, **{self.decoder_cache_argument: cache})
        predicted = out.last_hidden_state
        return HeadOutput(logits=self.lm_head(predicted.to(self.lm_head.weight.dtype)), hidden_states=(predicted,))


def save_head(head: EagleHead, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the head's own weights (safetensors) and its config to ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in head.trainable_state().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({"config": head.config.to_dict(), **(extra or {})}, indent=2))


def load_head(directory: Path, target_model: nn.Module) -> EagleHead:
    """Load a saved head onto ``target_model``'s device and dtype, sharing its embedding and ``lm_head``."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    meta = json.loads((Path(directory) / HEAD_CONFIG).read_text())
    config = LlamaConfig.from_dict(meta["config"])
    if config.hidden_size != target_model.config.hidden_size or config.vocab_size != target_model.config.vocab_size:
        raise ValueError(f"head in {directory} was trained for hidden size {config.hidden_size} / vocabulary "
                         f"{config.vocab_size}, not this target's {target_model.config.hidden_size} / "
                         f"{target_model.config.vocab_size}")
    head = EagleHead(config, target_model.get_input_embeddings(), target_model.get_output_embeddings())
    missing, unexpected = head.load_state_dict(load_file(str(Path(directory) / HEAD_WEIGHTS)), strict=False)
    missing = [name for name in missing if not name.startswith(("embed_tokens.", "lm_head."))]
    if missing or unexpected:
        raise ValueError(f"head in {directory} does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    parameter = next(target_model.parameters())
    return head.to(device=parameter.device, dtype=parameter.dtype).eval()
