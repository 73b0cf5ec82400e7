"""Per-prompt and per-group metrics as PROTOCOL.md defines them: paired speedups, intervals, bounds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def prompt_totals(prompt: dict[str, Any]) -> dict[str, float]:
    """Sum one prompt's turns into baseline and strategy totals."""
    totals: dict[str, float] = {}
    for turn in prompt["turns"]:
        for side in ("baseline", "strategy"):
            trace = turn[side]
            for key in ("wall_s", "new_tokens", "steps", "drafted", "accepted", "cost_units", "target_calls"):
                totals[f"{side}_{key}"] = totals.get(f"{side}_{key}", 0.0) + float(trace[key])
            totals[f"{side}_tree"] = float(bool(trace.get("extras", {}).get("tree")))
            for role, stats in trace["forward"].items():
                kind = "target" if role == "target" else "draft"
                for key in ("decode_calls", "decode_seconds"):
                    name = f"{side}_{kind}_{key}"
                    totals[name] = totals.get(name, 0.0) + float(stats[key])
        totals["turns"] = totals.get("turns", 0.0) + 1
        totals["matches"] = totals.get("matches", 0.0) + float(turn["tokens_match"])
    return totals


def ratio_interval(numerators: np.ndarray, denominators: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (over prompts) of Σ numerators / Σ denominators."""
    count = len(numerators)
    if count < 2:
        value = float(numerators.sum() / denominators.sum()) if count else math.nan
        return value, value
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, count, size=(BOOTSTRAP_SAMPLES, count))
    ratios = numerators[picks].sum(axis=1) / denominators[picks].sum(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def speedup_bound(alpha: float | None, drafted_per_step: float, target_step_s: float, draft_s_per_step: float) -> float:
    """Leviathan et al.'s ideal speedup for acceptance ``alpha`` and ``drafted_per_step`` = gamma.

    Expected tokens per step ``(1 - alpha^(gamma+1)) / (1 - alpha)`` divided by
    the cost of a step relative to one target forward, ``1 + draft time per
    step / target forward time`` (the verification pass counted as one forward).
    """
    if alpha is None or drafted_per_step <= 0 or target_step_s <= 0:
        return 1.0
    gamma = drafted_per_step
    expected = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return expected / (1 + draft_s_per_step / target_step_s)


def summarize(prompts: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """The per-group metrics (speedup with interval, tau, alpha, cost speedup, bound, match rate) over ``prompts``."""
    rows = [prompt_totals(prompt) for prompt in prompts]
    if not rows:
        return {}
    def column(name: str) -> np.ndarray:
        return np.array([row.get(name, 0.0) for row in rows])
    base_wall, strat_wall = column("baseline_wall_s"), column("strategy_wall_s")
    speedup = float(base_wall.sum() / strat_wall.sum())
    low, high = ratio_interval(base_wall, strat_wall, seed)
    drafted, accepted, steps = column("strategy_drafted").sum(), column("strategy_accepted").sum(), column("strategy_steps").sum()
    alpha = float(accepted / drafted) if drafted else None
    target_step_s = column("baseline_target_decode_seconds").sum() / max(1.0, column("baseline_target_decode_calls").sum())
    draft_s_per_step = column("strategy_draft_decode_seconds").sum() / max(1.0, steps)
    bound = speedup_bound(alpha, drafted / max(1.0, steps), target_step_s, draft_s_per_step)
    if column("strategy_tree").any():
        bound = math.nan  # Leviathan's bound is for chains; a tree's α counts every verified node
    new_tokens = column("strategy_new_tokens").sum()
    return {
        "prompts": len(rows),
        "turns": int(column("turns").sum()),
        "new_tokens": int(new_tokens),
        "baseline_wall_s": float(base_wall.sum()),
        "strategy_wall_s": float(strat_wall.sum()),
        "baseline_ms_per_token": 1e3 * float(base_wall.sum() / max(1.0, column("baseline_new_tokens").sum())),
        "strategy_ms_per_token": 1e3 * float(strat_wall.sum() / max(1.0, new_tokens)),
        "speedup": speedup,
        "speedup_low": low,
        "speedup_high": high,
        "tau": float(new_tokens / max(1.0, steps)),
        "alpha": alpha,
        "cost_speedup": float(column("baseline_cost_units").sum() / max(1.0, column("strategy_cost_units").sum())),
        "target_calls": int(column("strategy_target_calls").sum()),
        "baseline_target_calls": int(column("baseline_target_calls").sum()),
        "bound": bound,
        "efficiency": speedup / bound if bound else math.nan,
        "match_rate": float(column("matches").sum() / column("turns").sum()),
    }
