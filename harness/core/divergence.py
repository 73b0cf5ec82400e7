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
  ``r_b`` and ``r_s`` of the baseline's token ``b`` and the strategy's token ``s``,
  and the reference gap ``G = |r_b - r_s|``;
- in the cell's dtype, by the target itself, along the computation paths that
  decoding takes to that position (``DTYPE_PATHS``): a forward over the whole
  prefix, and the prefix's last 1, 4 and 8 tokens fed to a cache of the rest
  (a one-token step and verification widths). On each path the dtype's
  logits ``d_b``, ``d_s`` err on the gap by at most ``|d_b - r_b| + |d_s - r_s|``;
  ``e`` is the largest such error over the paths.

The baseline's one-token step and the strategy's verification each compute the
gap with such an error, so they can disagree on its sign only if ``G`` is at
most the sum of their two errors. The divergence is a **tie** when ``G`` is
within ``max(TIE_ULPS units in the last place, 2 e)``, and **real** otherwise:

- the units: each side stores the two logits rounded to half a unit, so
  rounding alone can move the gap by one unit per side; ``TIE_ULPS`` = 2 units
  of the dtype at the larger logit's magnitude;
- ``2 e``: the measured error on this very prefix, once for each side.

A token the target ranks below another by more than that is never the target's
pick in this dtype's rounding along those paths, so accepting it is an error: it
fails the cell like a float32 mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.core.lm import cache_argument

TIE_ULPS = 2.0
DTYPE_PATHS = (0, 1, 4, 8)  # 0: a forward over the whole prefix; k: its last k tokens after a cache of the rest


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


def tie_bound(reference: tuple[float, float], in_dtype: list[tuple[float, float]], dtype: torch.dtype) -> float:
    """The largest logit gap between two tokens (float32 ``reference`` logits) that ``dtype``'s rounding can
    reverse, given the two logits computed in ``dtype`` along several paths (module docstring)."""
    units = TIE_ULPS * unit_in_last_place(max(abs(reference[0]), abs(reference[1])), dtype)
    error = max((abs(d[0] - reference[0]) + abs(d[1] - reference[1]) for d in in_dtype), default=0.0)
    return max(units, 2 * error)


@torch.inference_mode()
def last_logits(model: torch.nn.Module, ids: list[int], cached: int = 0) -> torch.Tensor:
    """``model``'s float32 logits after ``ids``: one uncached forward (``cached`` 0), or a forward of the last
    ``cached`` tokens after a cache of the ones before them."""
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    if not cached or cached >= len(ids):
        return model(input_ids=tokens, use_cache=False).logits[0, -1].float().cpu()
    start = model(input_ids=tokens[:, :-cached], use_cache=True)
    out = model(input_ids=tokens[:, -cached:], use_cache=True, **{cache_argument(model): start.past_key_values})
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
    r = (float(reference[base_token]), float(reference[strat_token]))
    paths = [last_logits(dtype_model, prefix, cached) for cached in DTYPE_PATHS if cached < len(prefix)]
    d = [(float(logits[base_token]), float(logits[strat_token])) for logits in paths]
    dtype = next(dtype_model.parameters()).dtype
    gap, bound = abs(r[0] - r[1]), tie_bound(r, d, dtype)
    return Divergence(kind="tie" if gap <= bound else "real", position=position, baseline_token=base_token,
                      strategy_token=strat_token, gap=gap, bound=bound, logit=max(r))
