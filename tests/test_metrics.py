"""The metrics module on hand-made records: speedup and its interval, bound, efficiency, per-position acceptance,
the accepted-length histogram and the time split."""

from __future__ import annotations

import math

import pytest

from harness.core.metrics import accepted_histogram, position_acceptance, speedup_bound, summarize, time_split
from harness.core.records import PromptRecord


def trace(tokens: int, wall: float, steps: list[list[int]] | None = None, target_seconds: float = 0.0,
          target_calls: int = 0, draft_seconds: float = 0.0, prefill_seconds: float = 0.0, prefill_tokens: int = 0,
          probe: float = 0.001) -> dict:
    steps = steps if steps is not None else [[0, 0]] * tokens
    forward = {"target": {"decode_calls": target_calls, "decode_seconds": target_seconds,
                          "prefill_seconds": prefill_seconds, "prefill_tokens": prefill_tokens}}
    if draft_seconds:
        forward["draft"] = {"decode_calls": 1, "decode_seconds": draft_seconds, "prefill_seconds": 0.0}
    return {"wall_s": wall, "new_tokens": tokens, "steps": len(steps), "step_counts": steps,
            "drafted": sum(d for d, _ in steps), "accepted": sum(a for _, a in steps), "cost_units": 1.0,
            "target_calls": target_calls, "forward": forward, "probe_s": probe, "extras": {}}


def prompt(baseline: dict, strategy: dict) -> PromptRecord:
    return PromptRecord.from_json({"prompt_id": "p", "category": None,
                                   "turns": [{"baseline": baseline, "strategy": strategy, "tokens_match": True}]})


def test_position_acceptance_is_conditional_on_the_previous_position():
    steps = [[4, 4], [4, 1], [4, 0], [2, 2], [0, 0]]
    rates = position_acceptance(steps, positions=5)
    assert rates[0] == pytest.approx(3 / 4)   # 4 steps drafted a 1st token, 3 kept it
    assert rates[1] == pytest.approx(2 / 3)   # 3 reached position 2 ([4,4], [4,1], [2,2]), 2 kept it
    assert rates[2] == 1.0 and rates[3] == 1.0  # only [4,4] reached positions 3 and 4
    assert rates[4] is None


def test_accepted_histogram_counts_drafting_steps_only():
    assert accepted_histogram([[4, 4], [4, 1], [4, 0], [2, 2], [0, 0], [3, 1]]) == {0: 1, 1: 2, 2: 1, 4: 1}


def test_time_split_shares_sum_to_one_with_host_time_as_the_rest():
    split = time_split({"strategy_wall_s": 2.0, "strategy_draft_decode_seconds": 0.3,
                        "strategy_draft_prefill_seconds": 0.1, "strategy_target_decode_seconds": 1.0,
                        "strategy_target_prefill_seconds": 0.2})
    assert split == pytest.approx({"draft": 0.2, "verify": 0.5, "prefill": 0.1, "other": 0.2})


def test_speedup_pools_throughput_and_bound_and_efficiency_follow_their_formulas():
    # Baseline: 10 tokens in 1.0 s per prompt, 10 target steps of 0.09 s. Strategy: 2 steps of 4 drafted tokens.
    base = trace(10, 1.0, target_seconds=0.9, target_calls=10)
    fast = trace(10, 0.5, steps=[[4, 3], [4, 4]], target_seconds=0.2, target_calls=2, draft_seconds=0.08)
    slow = trace(10, 0.25, steps=[[4, 3], [4, 4]], target_seconds=0.2, target_calls=2, draft_seconds=0.08)
    summary = summarize([prompt(base, fast), prompt(base, slow)])
    assert summary["speedup"] == pytest.approx((20 / 0.75) / (20 / 2.0))
    assert summary["speedup_low"] <= summary["speedup"] <= summary["speedup_high"]
    assert summary["alpha"] == pytest.approx(14 / 16)
    assert summary["tau"] == pytest.approx(20 / 4)
    alpha, gamma = 14 / 16, 4.0
    expected = (1 - alpha ** (gamma + 1)) / (1 - alpha) / (1 + (0.16 / 4) / 0.09)
    assert summary["bound"] == pytest.approx(expected)
    assert summary["bound"] == pytest.approx(speedup_bound(alpha, gamma, 0.09, 0.04))
    assert summary["efficiency"] == pytest.approx(summary["speedup"] / expected)
    assert summary["position_acceptance"][:4] == pytest.approx([1.0, 1.0, 1.0, 0.5])


def test_a_single_prompt_has_a_degenerate_interval_and_no_draft_gives_bound_one():
    base = trace(8, 1.0, target_seconds=0.8, target_calls=8)
    summary = summarize([prompt(base, trace(8, 0.8, target_seconds=0.7, target_calls=8))])
    assert summary["speedup_low"] == summary["speedup_high"] == pytest.approx(1.25)
    assert summary["alpha"] is None and summary["bound"] == 1.0
    assert all(rate is None for rate in summary["position_acceptance"])
    assert not math.isnan(summary["time_split"]["verify"])


def test_the_drift_guard_flags_a_prefill_that_slowed_on_one_side_only():
    """Equal probes (load came and went between them) but the same prompt prefilled 1.5x slower per token on the
    strategy side: flagged; within twice the tolerance: not flagged."""
    def cell(strategy_prefill: float) -> dict:
        base = trace(8, 1.0, target_seconds=0.8, target_calls=8, prefill_seconds=0.10, prefill_tokens=50)
        strat = trace(8, 1.0, target_seconds=0.8, target_calls=8, prefill_seconds=strategy_prefill, prefill_tokens=50)
        return summarize([prompt(base, strat), prompt(base, strat)], drift_tolerance=0.10)

    slowed = cell(0.15)
    assert slowed["timing_suspect"] and "prompt prefill" in slowed["timing_note"]
    assert slowed["prefill_drift"] == pytest.approx(0.5)
    steady = cell(0.115)
    assert not steady["timing_suspect"] and steady["prefill_drift"] == pytest.approx(0.15)


def interleaved(pairs: list[tuple[float, float]], base_cpu: tuple[float, float] = (1.0, 0.0),
                strat_cpu: tuple[float, float] = (1.0, 0.0)) -> list[PromptRecord]:
    """One prompt per (baseline probe, strategy probe) pair, run back to back, with each side's CPU run and wait."""
    prompts = []
    for base_probe, strat_probe in pairs:
        base, strat = trace(8, 1.0, probe=base_probe), trace(8, 0.8, probe=strat_probe)
        base["extras"] = {"cpu_run_s": base_cpu[0], "cpu_wait_s": base_cpu[1]}
        strat["extras"] = {"cpu_run_s": strat_cpu[0], "cpu_wait_s": strat_cpu[1]}
        prompts.append(PromptRecord.from_json({"prompt_id": "p", "category": None, "turns": [
            {"baseline": base, "strategy": strat, "tokens_match": True, "first": "baseline"}]}))
    return prompts


def test_the_drift_guard_flags_a_side_that_waited_for_the_cpu():
    steady = [(0.001, 0.001)] * 6
    quiet = summarize(interleaved(steady, base_cpu=(1.0, 0.02), strat_cpu=(1.0, 0.03)))
    assert not quiet["timing_suspect"] and quiet["strategy_cpu_wait"] == pytest.approx(0.03 / 1.03)
    contended = summarize(interleaved(steady, base_cpu=(1.0, 0.02), strat_cpu=(0.7, 0.3)), max_cpu_wait=0.10)
    assert contended["timing_suspect"]
    assert "waited for a CPU 30% of their runnable time on the strategy side and 2% on the baseline side" in \
        contended["timing_note"]
    assert not summarize(interleaved(steady, strat_cpu=(0.7, 0.3)), max_cpu_wait=0.5)["timing_suspect"]


def test_the_probe_drift_band_widens_with_the_probes_own_noise():
    # The same +17.5 % median drift: flagged when the probes agree turn by turn, not when they scatter by ±25 %.
    tight = [(1e-3, s * 1e-3) for s in (1.17, 1.18, 1.175, 1.17, 1.18, 1.175)]
    loose = [(1e-3, s * 1e-3) for s in (1.15, 0.9, 1.4, 0.85, 1.3, 1.2)]
    flagged, unflagged = summarize(interleaved(tight)), summarize(interleaved(loose))
    assert flagged["step_drift"] == pytest.approx(0.175) == unflagged["step_drift"]
    assert flagged["drift_band"] == pytest.approx(0.10) and flagged["timing_suspect"]
    assert "1-token step" in flagged["timing_note"]
    assert unflagged["drift_band"] > 0.175 and not unflagged["timing_suspect"]
