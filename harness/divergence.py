"""The tie-aware lossless check: is a greedy divergence from the baseline a numerical tie, or a real error?

In float32 a lossless strategy reproduces the baseline token for token, and any
difference is an error. In bfloat16 or float16 it need not: a verification pass
scores several tokens in one forward and rounds differently from one-token
steps, so where the target's top two tokens are (nearly) tied the two sides may
pick differently and then go their own ways. A match rate cannot tell such a
tie from a verifier that accepts a wrong token; this module can.

At the first position where a strategy's tokens differ from the baseline's, the
common prefix (prompt plus the tokens both produced) is scored once more:

- in float32, by a float32 copy of the target: the reference logits
  ``r_b`` and ``r_s`` of the baseline's token ``b`` and the strategy's token ``s``;
- in the cell's dtype, by the target itself: ``d_b`` and ``d_s``.

The divergence is a **tie** when the reference gap ``|r_b - r_s|`` is within the
bound that the dtype's rounding allows, and **real** otherwise. The bound is
the larger of

- ``TIE_ULPS`` units in the last place of the dtype at the larger of the two
  logits' magnitudes: the dtype stores each logit to half a unit, so rounding
  the output alone can move a gap by one unit, and we allow one more for the
  accumulated rounding of the layers below (every divergence measured on
  SmolLM2-135M in bfloat16 was within 1.8 units);
- ``|d_b - r_b| + |d_s - r_s|``: the dtype's own error on these two logits,
  measured on this very prefix; a gap smaller than the sum of the two errors
  can be reversed by them.

A token the target ranks below another by more than that is never the
target's pick in any rounding of this dtype, so accepting it is an error: it
fails the cell like a float32 mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIE_ULPS = 2.0


@dataclass
class Divergence:
    """The first differing position of a turn, classified: ``kind`` is ``tie`` or ``real``."""

    kind: str
    position: int  # index into the new tokens
    baseline_token: int
    strategy_token: int
    gap: float  # |r_b - r_s|: the float32 target's logit gap between the two tokens
    bound: float  # the largest gap the dtype's rounding can reverse (module docstring)
    logit: float  # the larger float32 logit of the two

    @property
    def is_tie(self) -> bool:
        return self.kind == "tie"


def unit_in_last_place(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s numbers at ``|value|`` (its machine epsilon times the power of two below it)."""
    magnitude = max(abs(value), torch.finfo(dtype).tiny)
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def tie_bound(reference: tuple[float, float], in_dtype: tuple[float, float], dtype: torch.dtype) -> float:
    """The largest logit gap between two tokens that ``dtype``'s rounding can reverse (module docstring)."""
    units = TIE_ULPS * unit_in_last_place(max(abs(reference[0]), abs(reference[1])), dtype)
    measured = abs(in_dtype[0] - reference[0]) + abs(in_dtype[1] - reference[1])
    return max(units, measured)


@torch.inference_mode()
def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """``model``'s float32 logits after ``ids`` (one uncached forward)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0, -1].float().cpu()


def classify(reference_model: torch.nn.Module, dtype_model: torch.nn.Module, prompt_ids: list[int],
             baseline: list[int], strategy: list[int], position: int, eos_token_id: int) -> Divergence:
    """Classify the divergence at new-token ``position`` of ``strategy`` from ``baseline`` after ``prompt_ids``.

    ``reference_model`` is the target in float32, ``dtype_model`` the target in the cell's dtype. A side that
    ended before ``position`` stands for ``eos_token_id`` there.
    """
    prefix = list(prompt_ids) + list(baseline[:position])
    base_token = baseline[position] if position < len(baseline) else eos_token_id
    strat_token = strategy[position] if position < len(strategy) else eos_token_id
    reference = last_logits(reference_model, prefix)
    in_dtype = last_logits(dtype_model, prefix)
    r = (float(reference[base_token]), float(reference[strat_token]))
    d = (float(in_dtype[base_token]), float(in_dtype[strat_token]))
    dtype = next(dtype_model.parameters()).dtype
    gap, bound = abs(r[0] - r[1]), tie_bound(r, d, dtype)
    return Divergence(kind="tie" if gap <= bound else "real", position=position, baseline_token=base_token,
                      strategy_token=strat_token, gap=gap, bound=bound, logit=max(r))
