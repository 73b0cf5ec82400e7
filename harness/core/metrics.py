"""Per-prompt and per-group metrics (each defined in ``summarize``'s docstring): paired speedups, intervals,
bounds, and the drift guard that flags timings a reviewer should not trust.

Speedup is a ratio of throughputs: (strategy tokens / strategy seconds) / (baseline tokens / baseline seconds),
pooled over the prompts of a group. Under greedy decoding both sides generate the same tokens, so this equals
the ratio of wall times; under sampling the two sides may generate different numbers of tokens, and only the
throughput ratio compares like with like.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from harness.core.records import PromptRecord

BOOTSTRAP_SAMPLES = 2000
MAX_CPU_WAIT = 0.10  # the drift guard: the most run-queue wait (share of runnable time) a side may have
NOISE_Z = 3.0  # the drift guard: probe drift must exceed this many standard errors of the probe's own noise


def prompt_totals(prompt: PromptRecord) -> dict[str, Any]:
    """Sum one prompt's paired turns into baseline and strategy totals (and list each side's probe times)."""
    totals: dict[str, Any] = {}
    for turn in prompt.turns:
        if turn.strategy is None:
            raise ValueError(f"prompt {prompt.prompt_id}: a baseline-only turn has no strategy side to compare")
        for side, trace in (("baseline", turn.baseline), ("strategy", turn.strategy)):
            for key in ("wall_s", "new_tokens", "steps", "drafted", "accepted", "cost_units", "target_calls"):
                totals[f"{side}_{key}"] = totals.get(f"{side}_{key}", 0.0) + float(getattr(trace, key))
            totals[f"{side}_tree"] = float(trace.is_tree)
            if trace.probe_s is not None:
                totals.setdefault(f"{side}_probes", []).append(float(trace.probe_s))
            for key in ("cpu_run_s", "cpu_wait_s"):
                if key in trace.extras:
                    totals[f"{side}_{key}"] = totals.get(f"{side}_{key}", 0.0) + float(trace.extras[key])
            for role, stats in trace.forward.items():
                kind = "target" if role == "target" else "draft"
                for key in ("decode_calls", "decode_seconds", "prefill_seconds", "prefill_tokens"):
                    name = f"{side}_{kind}_{key}"
                    totals[name] = totals.get(name, 0.0) + float(stats.get(key, 0.0))
        if turn.baseline.probe_s and turn.strategy.probe_s and turn.first is not None:  # interleaved: adjacent runs
            totals.setdefault("probe_pairs", []).append((float(turn.baseline.probe_s), float(turn.strategy.probe_s)))
        totals.setdefault("step_counts", []).extend(turn.strategy.step_counts)
        totals["turns"] = totals.get("turns", 0.0) + 1
        totals["matches"] = totals.get("matches", 0.0) + float(bool(turn.tokens_match))
        if not turn.tokens_match and turn.first_divergence is not None:
            totals["divergent"] = totals.get("divergent", 0.0) + 1
            totals["divergence_tokens"] = totals.get("divergence_tokens", 0.0) + turn.first_divergence
        if turn.divergence is not None:
            kind = "tie_turns" if turn.divergence.is_tie else "real_divergences"
            totals[kind] = totals.get(kind, 0.0) + 1
    return totals


def throughput_ratio(base_tokens: np.ndarray, base_wall: np.ndarray, strat_tokens: np.ndarray,
                     strat_wall: np.ndarray) -> float:
    """(Σ strategy tokens / Σ strategy seconds) / (Σ baseline tokens / Σ baseline seconds)."""
    return float((strat_tokens.sum() / strat_wall.sum()) / (base_tokens.sum() / base_wall.sum()))


def ratio_interval(base_tokens: np.ndarray, base_wall: np.ndarray, strat_tokens: np.ndarray, strat_wall: np.ndarray,
                   seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (resampling prompts) of the pooled throughput ratio."""
    count = len(base_wall)
    if count < 2:
        value = throughput_ratio(base_tokens, base_wall, strat_tokens, strat_wall) if count else math.nan
        return value, value
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, count, size=(BOOTSTRAP_SAMPLES, count))
    ratios = ((strat_tokens[picks].sum(axis=1) / strat_wall[picks].sum(axis=1))
              / (base_tokens[picks].sum(axis=1) / base_wall[picks].sum(axis=1)))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def position_acceptance(step_counts: list[list[int]], positions: int = 8) -> list[float | None]:
    """Conditional acceptance by draft position: for i = 1..``positions``, the share of steps whose i-th drafted
    token was accepted among the steps that drafted an i-th token and accepted the (i-1)-th (vLLM's
    per-position counters, made conditional).

    ``step_counts`` holds ``[drafted, accepted]`` per chain step;
    rate_i = #(accepted >= i) / #(drafted >= i and accepted >= i - 1), None where no step reached position i.
    """
    rates: list[float | None] = []
    for position in range(1, positions + 1):
        reached = sum(1 for drafted, accepted in step_counts if drafted >= position and accepted >= position - 1)
        kept = sum(1 for drafted, accepted in step_counts if accepted >= position)
        rates.append(kept / reached if reached else None)
    return rates


def accepted_histogram(step_counts: list[list[int]]) -> dict[int, int]:
    """How many drafting steps accepted 0, 1, 2, ... tokens (steps that drafted nothing are left out)."""
    counts: dict[int, int] = {}
    for drafted, accepted in step_counts:
        if drafted:
            counts[accepted] = counts.get(accepted, 0) + 1
    return dict(sorted(counts.items()))


def time_split(totals: dict[str, float]) -> dict[str, float]:
    """The strategy side's wall time split into shares (summing to 1): ``draft`` = every non-target forward
    (drafts, heads, their prefills), ``verify`` = the target's decode forwards, ``prefill`` = the target's prompt
    prefill, ``other`` = the rest (host work between forwards: sampling, acceptance, cache bookkeeping)."""
    wall = totals.get("strategy_wall_s", 0.0)
    if wall <= 0:
        return {}
    draft = totals.get("strategy_draft_decode_seconds", 0.0) + totals.get("strategy_draft_prefill_seconds", 0.0)
    verify = totals.get("strategy_target_decode_seconds", 0.0)
    prefill = totals.get("strategy_target_prefill_seconds", 0.0)
    shares = {"draft": draft / wall, "verify": verify / wall, "prefill": prefill / wall}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def roc_auc(labels: list[int] | list[bool], scores: list[float]) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (SpaDec's predictor: accepted = 1).

    AUC = P(score of a random positive > score of a random negative) + ½ P(equal), the Mann-Whitney U statistic
    over (#positives × #negatives); None when either class is empty.
    """
    positives = [score for label, score in zip(labels, scores) if label]
    negatives = [score for label, score in zip(labels, scores) if not label]
    if not positives or not negatives:
        return None
    ordered = np.sort(np.asarray(negatives, dtype=float))
    wins = 0.0
    for score in positives:
        below = np.searchsorted(ordered, score, side="left")
        equal = np.searchsorted(ordered, score, side="right") - below
        wins += below + 0.5 * equal
    return float(wins / (len(positives) * len(negatives)))


def mean_accepted(new_tokens: float, steps: float) -> float:
    """τ (mean accepted tokens): new tokens per target verification step (1 for autoregressive decoding)."""
    return float(new_tokens / max(1.0, steps))


def acceptance_rate(accepted: float, drafted: float) -> float | None:
    """α (acceptance rate): accepted draft tokens / drafted tokens; None when nothing was drafted."""
    return float(accepted / drafted) if drafted else None


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


def summarize(prompts: list[PromptRecord], seed: int = 0, sampled: bool = False,
              drift_tolerance: float = 0.10, max_cpu_wait: float = MAX_CPU_WAIT) -> dict[str, Any]:
    """The per-group metrics over ``prompts`` (sums run over every turn of every prompt, strategy side unless
    named):

    - speedup = (Σ tokens / Σ wall s) / (Σ baseline tokens / Σ baseline wall s); its 95 % interval resamples
      prompts (``ratio_interval``);
    - τ (mean accepted tokens) = Σ new tokens / Σ verification steps;
    - α (acceptance rate) = Σ accepted draft tokens / Σ drafted tokens, None when nothing was drafted;
    - drafted per step = Σ drafted tokens / Σ steps (γ for a constant schedule; what an adaptive one chose);
    - cost speedup = Σ baseline cost units / Σ cost units (CS Drafting's parameter-count units);
    - bound = ``speedup_bound``(α, Σ drafted / Σ steps, baseline s per target decode call, draft decode s per
      step); NaN for trees;
    - efficiency = speedup / bound;
    - match rate = turns whose tokens equal the baseline's / turns, None for ``sampled`` decoding, where outputs
      may legitimately differ;
    - position acceptance, accepted-length histogram and time split as their functions define them (chains
      only for the first two), and the drift guard of ``timing_from_totals``;
    - for batched turns, each side's per-request latency (``request_latency``).
    """
    rows = [prompt_totals(prompt) for prompt in prompts]
    if not rows:
        return {}
    def column(name: str) -> np.ndarray:
        return np.array([row.get(name, 0.0) for row in rows])
    base_wall, strat_wall = column("baseline_wall_s"), column("strategy_wall_s")
    base_tokens, strat_tokens = column("baseline_new_tokens"), column("strategy_new_tokens")
    speedup = throughput_ratio(base_tokens, base_wall, strat_tokens, strat_wall)
    low, high = ratio_interval(base_tokens, base_wall, strat_tokens, strat_wall, seed)
    drafted, accepted, steps = column("strategy_drafted").sum(), column("strategy_accepted").sum(), column("strategy_steps").sum()
    alpha = acceptance_rate(accepted, drafted)
    target_step_s = column("baseline_target_decode_seconds").sum() / max(1.0, column("baseline_target_decode_calls").sum())
    draft_s_per_step = column("strategy_draft_decode_seconds").sum() / max(1.0, steps)
    bound = speedup_bound(alpha, drafted / max(1.0, steps), target_step_s, draft_s_per_step)
    if column("strategy_tree").any():
        bound = math.nan  # Leviathan's bound is for chains; a tree's α counts every verified node
    new_tokens = column("strategy_new_tokens").sum()
    step_counts = [] if column("strategy_tree").any() else [pair for row in rows for pair in row.get("step_counts", [])]
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
        "tau": mean_accepted(new_tokens, steps),
        "alpha": alpha,
        "drafted_per_step": float(drafted / max(1.0, steps)),
        "cost_speedup": float(column("baseline_cost_units").sum() / max(1.0, column("strategy_cost_units").sum())),
        "target_calls": int(column("strategy_target_calls").sum()),
        "baseline_target_calls": int(column("baseline_target_calls").sum()),
        "bound": bound,
        "efficiency": speedup / bound if bound else math.nan,
        "match_rate": None if sampled else float(column("matches").sum() / column("turns").sum()),
        **({} if sampled else divergence_summary(column)),
        "position_acceptance": position_acceptance(step_counts),
        "accepted_histogram": accepted_histogram(step_counts),
        "time_split": time_split({name: float(column(name).sum()) for name in (
            "strategy_wall_s", "strategy_draft_decode_seconds", "strategy_draft_prefill_seconds",
            "strategy_target_decode_seconds", "strategy_target_prefill_seconds")}),
        **timing_from_totals(rows, drift_tolerance, speedup, max_cpu_wait),
        **request_latency(prompts, "strategy"),
        **request_latency(prompts, "baseline"),
    }


def request_latency(prompts: list[PromptRecord], side: str) -> dict[str, float]:
    """Per-request latency of one side (``baseline`` or ``strategy``) of batched turns, in ms: time to first token
    (from its batch's start) and time per output token after it ((last - first) / (tokens - 1)), each as mean,
    p50 and p99 over turns. Empty when no turn ran in a batch (batch size 1 records no per-row times)."""
    first, per_token = [], []
    for prompt in prompts:
        for turn in prompt.turns:
            record = getattr(turn, side)
            batch = record.extras.get("batch") if record is not None else None
            if not batch or batch.get("first_token_s") is None:
                continue
            first.append(1e3 * batch["first_token_s"])
            if record.new_tokens > 1:
                per_token.append(1e3 * (batch["finished_s"] - batch["first_token_s"]) / (record.new_tokens - 1))
    latency: dict[str, float] = {}
    for name, values in (("ttft", first), ("tpot", per_token)):
        if values:
            latency.update({f"{side}_{name}_ms_mean": float(np.mean(values)),
                            f"{side}_{name}_ms_p50": float(np.percentile(values, 50)),
                            f"{side}_{name}_ms_p99": float(np.percentile(values, 99))})
    return latency


def divergence_summary(column) -> dict[str, Any]:
    """Greedy turns by outcome: exact, tie-divergent, real divergences (classified in dtypes other than float32)
    and unclassified, and the mean number of tokens before the first divergence of the turns that diverged."""
    divergent = float(column("divergent").sum())
    ties, real = int(column("tie_turns").sum()), int(column("real_divergences").sum())
    return {"exact_turns": int(column("matches").sum()), "tie_turns": ties, "real_divergences": real,
            "unclassified_divergences": int(divergent) - ties - real,
            "tokens_to_divergence": float(column("divergence_tokens").sum() / divergent) if divergent else None}


def turn_outcomes(prompts: list[PromptRecord]) -> dict[str, Any]:
    """``divergence_summary`` of ``prompts`` alone (also for a cell that failed on a real divergence)."""
    rows = [prompt_totals(prompt) for prompt in prompts]
    return divergence_summary(lambda name: np.array([row.get(name, 0.0) for row in rows]))


def timing_check(prompts: list[PromptRecord], tolerance: float, max_cpu_wait: float = MAX_CPU_WAIT) -> dict[str, Any]:
    """The drift guard over ``prompts``; see ``timing_from_totals``."""
    totals = [prompt_totals(prompt) for prompt in prompts]
    speedup = throughput_ratio(*(np.array([row.get(name, 0.0) for row in totals]) for name in (
        "baseline_new_tokens", "baseline_wall_s", "strategy_new_tokens", "strategy_wall_s")))
    return timing_from_totals(totals, tolerance, speedup, max_cpu_wait)


def timing_from_totals(totals: list[dict[str, Any]], tolerance: float, speedup: float,
                       max_cpu_wait: float = MAX_CPU_WAIT) -> dict[str, Any]:
    """The drift guard: is this cell's timing trustworthy? (``totals`` from ``prompt_totals``.) A cell is
    ``timing_suspect`` when:

    - **contention**: the worker's threads spent more than ``max_cpu_wait`` of their runnable time waiting for a CPU
      (Linux's run-queue wait) on either side: something else held the machine, which distorts a method of many
      small calls more than the baseline, whatever the pairing;
    - **probe drift**: the target's 1-token probe (the median of 5 forwards, timed after every run) moved between
      the sides by more than ``tolerance`` and by more than ``NOISE_Z`` standard errors of the probe's own noise in
      this cell: from the turn-by-turn differences of adjacent probes under interleaved pairing, else from each
      side's spread (median absolute deviation), so a noisy machine widens the band instead of crying wolf;
    - **prefill drift** (shared pairing only, where the sides run at different times): the same prompt tokens were
      prefilled faster or slower per token on one side by more than twice ``tolerance``;
    - **ceiling**: the speedup exceeds τ × (baseline 1-token step time ÷ strategy verification-step time), which no
      strategy can beat.
    """
    def total(name: str) -> float:
        return sum(row.get(name, 0.0) for row in totals)
    reasons = []
    waits = {}
    for side in ("baseline", "strategy"):
        runnable = total(f"{side}_cpu_run_s") + total(f"{side}_cpu_wait_s")
        waits[side] = total(f"{side}_cpu_wait_s") / runnable if runnable > 0 else math.nan
    if any(share > max_cpu_wait for share in waits.values()):
        reasons.append(f"the worker's threads waited for a CPU {waits['strategy']:.0%} of their runnable time on the "
                       f"strategy side and {waits['baseline']:.0%} on the baseline side (limit {max_cpu_wait:.0%}): "
                       "other work contended for the machine")
    base_probes = [probe for row in totals for probe in row.get("baseline_probes", [])]
    strat_probes = [probe for row in totals for probe in row.get("strategy_probes", [])]
    pairs = [pair for row in totals for pair in row.get("probe_pairs", [])]
    drift = noise = band = math.nan
    if base_probes and strat_probes:
        base_ms, strat_ms = 1e3 * float(np.median(base_probes)), 1e3 * float(np.median(strat_probes))
        drift = strat_ms / base_ms - 1
        noise = probe_noise(base_probes, strat_probes, pairs)
        band = max(tolerance, math.expm1(NOISE_Z * noise)) if not math.isnan(noise) else tolerance
        if abs(drift) > band:
            reasons.append(f"the target's 1-token step took {strat_ms:.2f} ms on the strategy side and "
                           f"{base_ms:.2f} ms on the baseline side ({drift:+.0%}; band {band:.0%}: the larger of "
                           f"the tolerance and {NOISE_Z:g} standard errors of the probe's own noise)")
    else:
        base_ms = strat_ms = math.nan
    prefill_drift = math.nan
    base_prefill, strat_prefill = total("baseline_target_prefill_tokens"), total("strategy_target_prefill_tokens")
    if base_prefill > 0 and strat_prefill > 0 and total("baseline_target_prefill_seconds") > 0:
        base_rate = total("baseline_target_prefill_seconds") / base_prefill
        strat_rate = total("strategy_target_prefill_seconds") / strat_prefill
        prefill_drift = strat_rate / base_rate - 1
        if not pairs and abs(prefill_drift) > 2 * tolerance:
            reasons.append(f"the target's prompt prefill took {1e6 * strat_rate:.0f} µs/token on the strategy side "
                           f"and {1e6 * base_rate:.0f} µs/token on the baseline side ({prefill_drift:+.0%}; "
                           f"tolerance {2 * tolerance:.0%})")
    step_s = total("baseline_target_decode_seconds") / max(1.0, total("baseline_target_decode_calls"))
    verify_s = total("strategy_target_decode_seconds") / max(1.0, total("strategy_target_decode_calls"))
    tau = mean_accepted(total("strategy_new_tokens"), total("strategy_steps"))
    ceiling = tau * step_s / verify_s if verify_s > 0 and step_s > 0 else math.nan
    if not math.isnan(ceiling) and speedup > ceiling:
        reasons.append(f"speedup {speedup:.2f} exceeds its ceiling τ × step / verify = {ceiling:.2f}")
    return {"baseline_probe_ms": base_ms, "strategy_probe_ms": strat_ms, "step_drift": drift,
            "probe_noise": noise, "drift_band": band, "prefill_drift": prefill_drift,
            "baseline_cpu_wait": waits["baseline"], "strategy_cpu_wait": waits["strategy"],
            "speedup_ceiling": ceiling, "timing_suspect": bool(reasons), "timing_note": "; ".join(reasons)}


def probe_noise(base_probes: list[float], strat_probes: list[float], pairs: list[tuple[float, float]]) -> float:
    """The standard error, in log units, of the difference between the sides' probe medians as this cell's own
    probes measure it: from the differences of adjacent (interleaved) probe pairs when there are at least 3, else
    from each side's spread about its median (1.4826 × median absolute deviation, pooled; 1.2533 × σ per median).
    NaN when there are too few probes to say."""
    if len(pairs) >= 3:
        differences = np.log([strat / base for base, strat in pairs])
        return float(np.std(differences, ddof=1) / math.sqrt(len(differences)))
    if len(base_probes) < 2 or len(strat_probes) < 2:
        return math.nan
    logs = [np.log(base_probes), np.log(strat_probes)]
    deviations = np.concatenate([np.abs(side - np.median(side)) for side in logs])
    sigma = 1.4826 * float(np.median(deviations))
    return 1.2533 * sigma * math.sqrt(1 / len(base_probes) + 1 / len(strat_probes))
