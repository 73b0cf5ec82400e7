"""Medusa-1 heads (Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
2024): K extra heads on the target's last hidden state, head k predicting the token k + 2 places ahead.

Each head is ``num_layers`` residual blocks (``x + SiLU(Linear(x))``, the linear's weight zero-initialised and
its bias left at PyTorch's default, as in the reference) and a vocabulary projection initialised from the target's
LM head. Every block has its own weights (the reference's ``[ResBlock(d)] * L`` shares one block when L > 1; the
published heads have L = 1). The heads read the
hidden state the target's LM head reads (after the final norm).

Saved in the published layout, so published heads load and ours load in Medusa's own code: ``config.json``
(``medusa_num_heads``, ``medusa_num_layers``, ``hidden_size``, ``vocab_size``, ``base_model_name_or_path``;
on loading, the weights' keys decide the head and block counts: the published Vicuna configs say 2 heads for 5) and
``medusa_lm_head.safetensors`` (or a published ``medusa_lm_head.pt``) holding ``{k}.{j}.linear.weight`` /
``.bias`` for block j of head k and ``{k}.{num_layers}.weight`` for its projection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG = "config.json"
WEIGHTS = "medusa_lm_head.safetensors"
PUBLISHED_WEIGHTS = "medusa_lm_head.pt"
METRICS = "metrics.json"


class ResBlock(nn.Module):
    """``x + SiLU(Linear(x))``, the linear's weight starting at zero."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """``num_heads`` heads of ``num_layers`` residual blocks and a ``hidden -> vocab`` projection each; indexed
    like the published ``medusa_head`` module list."""

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden, self.vocab, self.num_heads, self.num_layers = hidden, vocab, num_heads, num_layers
        self.heads = nn.ModuleList([nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)],
                                                  nn.Linear(hidden, vocab, bias=False)) for _ in range(num_heads)])
        self.rank_accuracy: list[list[float]] | None = None  # [head][rank]: P(the head's rank-th token is right)

    @classmethod
    def for_target(cls, target: nn.Module, num_heads: int, num_layers: int = 1) -> "MedusaHeads":
        """Fresh heads for ``target``: identity blocks and projections copied from its LM head (Medusa-1's init)."""
        lm_head = target.get_output_embeddings().weight
        heads = cls(int(lm_head.shape[1]), int(lm_head.shape[0]), num_heads, num_layers).to(lm_head.device)
        with torch.no_grad():
            for head in heads.heads:
                head[-1].weight.copy_(lm_head.float())
        return heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[num_heads, ..., vocab]``: head k's prediction of the token k + 2 places after each position."""
        return torch.stack([head(hidden) for head in self.heads])

    def published_state(self) -> dict[str, torch.Tensor]:
        """The weights under the published key names."""
        return {f"{index}.{name}": value for index, head in enumerate(self.heads)
                for name, value in head.state_dict().items()}

    @torch.no_grad()
    def measure_rank_accuracy(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None,
                              ranks: int = 10, chunk: int = 8) -> list[list[float]]:
        """Per head, the share of (``mask``ed) positions where the token k + 2 places ahead is the head's r-th most
        likely, for r < ``ranks`` (Medusa's calibration of its sparse tree), over ``chunk`` windows at a time;
        kept in ``rank_accuracy``."""
        weights = torch.ones(ids.shape, device=ids.device) if mask is None else mask.float()
        hits = torch.zeros(self.num_heads, ranks, dtype=torch.float64)
        counts = torch.zeros(self.num_heads, dtype=torch.float64)
        for start in range(0, len(ids), chunk):
            logits = self(hidden[start:start + chunk].to(self.heads[0][-1].weight.dtype))
            window_ids, window_weights = ids[start:start + chunk], weights[start:start + chunk]
            for k in range(self.num_heads):
                shift = k + 2
                if window_ids.shape[1] <= shift:
                    continue
                top = logits[k, :, :-shift].topk(ranks, dim=-1).indices
                weight = window_weights[:, shift:, None]
                hits[k] += ((top == window_ids[:, shift:, None]).float() * weight).sum((0, 1)).double().cpu()
                counts[k] += float(weight.sum())
        self.rank_accuracy = [(hits[k] / counts[k]).tolist() if counts[k] else [0.0] * ranks
                              for k in range(self.num_heads)]
        return self.rank_accuracy

    def own_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())


def save_heads(heads: MedusaHeads, directory: Path, base_model: str = "", extra: dict[str, Any] | None = None) -> None:
    """Write ``heads`` to ``directory`` in the published layout; ``extra`` (and the heads' rank accuracies) go to
    ``metrics.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "hidden_size": heads.hidden, "vocab_size": heads.vocab, "base_model_name_or_path": base_model}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({name: value.detach().contiguous().cpu() for name, value in heads.published_state().items()},
              str(directory / WEIGHTS))
    extra = {**(extra or {}), **({"rank_accuracy": heads.rank_accuracy} if heads.rank_accuracy else {})}
    if extra:
        (directory / METRICS).write_text(json.dumps(extra, indent=2) + "\n")


def load_heads(directory: Path, device: torch.device | str = "cpu") -> MedusaHeads:
    """Heads saved by ``save_heads`` or published by Medusa (``medusa_lm_head.pt`` or ``.safetensors``)."""
    if not (directory / CONFIG).exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG} (not a Medusa heads directory)")
    if (directory / WEIGHTS).exists():
        state = load_file(str(directory / WEIGHTS))
    elif (directory / PUBLISHED_WEIGHTS).exists():
        state = torch.load(directory / PUBLISHED_WEIGHTS, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS} or {PUBLISHED_WEIGHTS}")
    num_heads = len({name.split(".")[0] for name in state})
    num_layers = len({name.split(".")[1] for name in state if name.startswith("0.") and ".linear." in name})
    projection = state[f"0.{num_layers}.weight"]
    heads = MedusaHeads(int(projection.shape[1]), int(projection.shape[0]), num_heads, num_layers)
    missing = set(heads.published_state()) - set(state)
    if missing:
        raise KeyError(f"{directory}: the Medusa weights lack {sorted(missing)[:3]}")
    heads.heads.load_state_dict(state, strict=True)
    if (directory / METRICS).exists():
        heads.rank_accuracy = json.loads((directory / METRICS).read_text()).get("rank_accuracy")
    return heads.to(device).eval()
