"""Cell records as they are written to ``cells.jsonl``: one side's trace, a paired turn, a token comparison.

Pure functions of a decoding trace (any object with a ``strategies.base.Trace``'s
fields), so the runner and the adaptive-drafts loop write the same records and
``harness.metrics`` reads them the same way.
"""

from __future__ import annotations

from typing import Any


def trace_record(trace: Any) -> dict[str, Any]:
    """The JSON-ready fields of a trace."""
    return {
        "new_tokens": trace.new_tokens,
        "wall_s": trace.wall_s,
        "target_calls": trace.target_calls,
        "steps": len(trace.steps),
        "step_counts": [[step.drafted, step.accepted] for step in trace.steps],
        "drafted": trace.drafted,
        "accepted": trace.accepted,
        "tau": trace.tau,
        "alpha": trace.alpha,
        "cost_units": trace.cost_units,
        "forward": trace.forward,
        "tokens": trace.tokens,
        "probe_s": trace.extras.get("probe_s"),
        "extras": {key: value for key, value in trace.extras.items() if key != "probe_s"},
    }


def match_record(baseline: list[int], strategy: list[int]) -> dict[str, Any]:
    """Whether two token lists are equal and, if not, the first position where they differ."""
    divergence = next((i for i, (a, b) in enumerate(zip(baseline, strategy)) if a != b), None)
    if divergence is None and len(baseline) != len(strategy):
        divergence = min(len(baseline), len(strategy))
    return {"tokens_match": divergence is None, "first_divergence": divergence}


def paired_turn(ids: list[int], baseline: dict[str, Any], trace: Any) -> dict[str, Any]:
    """One turn's record: its prompt, the baseline's trace record beside the strategy's, and whether they match."""
    return {"prompt_ids": ids, "prompt_tokens": len(ids), "baseline": baseline, "strategy": trace_record(trace),
            **match_record(baseline["tokens"], trace.tokens)}
