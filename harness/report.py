"""Reports of a run directory: ``cells.csv``, ``report.md`` and PNG plots, from ``cells.jsonl``.

Rows of the report group a strategy configuration over all shards of a prompt
set (one target); every speedup is the ratio of summed wall times against the
autoregressive baseline run on the same prompts in the same worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from harness.metrics import summarize
from harness.results import ResultStore

PAIRED_AGAINST = ("the autoregressive baseline (specsweep's own decoding loop) on the same prompts, target and "
                  "device type, run once per prompt shard and shared by every strategy on that shard")
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_COLUMNS = {
    "Multi-turn conversation": MT_BENCH,
    "Translation": ("translation",),
    "Summarization": ("summarization",),
    "QA": ("qa",),
    "Math reasoning": ("math_reasoning",),
    "RAG": ("rag",),
}


def params_label(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in params.items()) or "-"


def cell_rows(records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per cell record, with its metrics."""
    rows = []
    for cell_id, record in records.items():
        cell = record["cell"]
        row = {
            "cell_id": cell_id,
            "kind": record.get("kind", "strategy"),
            "status": record.get("status"),
            "target": cell["target"][0],
            "strategy": cell["strategy"],
            "params": params_label(cell["params"]),
            "prompt_set": cell["prompt_set"]["name"],
            "shard": cell["shard"],
            "device": record.get("env", {}).get("device", ""),
            "worker": record.get("worker", ""),
            "error": record.get("error", ""),
            "paired_with": record.get("paired_with", {}).get("cell_id", ""),
        }
        if record.get("status") == "ok" and row["kind"] == "strategy":
            row.update(summarize(record["prompts"]))
        rows.append(row)
    return pd.DataFrame(rows)


def grouped_prompts(records: dict[str, dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Paired prompt records of ok strategy cells by (target, strategy, params, prompt set), all shards pooled."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records.values():
        if record.get("status") != "ok" or record.get("kind", "strategy") != "strategy":
            continue
        cell = record["cell"]
        key = (cell["target"][0], cell["strategy"], params_label(cell["params"]), cell["prompt_set"]["name"])
        groups.setdefault(key, []).extend(record["prompts"])
    return groups


def group_rows(records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per (target, strategy, params, prompt set), pooling the prompts of all its shards."""
    rows = []
    for (target, strategy, params, prompt_set), prompts in grouped_prompts(records).items():
        rows.append({"target": target, "strategy": strategy, "params": params, "prompt_set": prompt_set,
                     **summarize(prompts)})
    return pd.DataFrame(rows)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    """A GitHub markdown table of ``frame``'s ``columns`` (name -> header)."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row.get(name)) for name in columns) + " |")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``cells.csv``, ``report.md`` and ``speedup.png`` into ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    records = ResultStore(run_dir).latest()
    if not records:
        raise FileNotFoundError(f"{run_dir}: no cell results (cells.jsonl missing or empty)")
    cells = cell_rows(records)
    cells.drop(columns=[], errors="ignore").to_csv(run_dir / "cells.csv", index=False)
    groups = group_rows(records)
    sections = [f"# specsweep report: {run_dir.parent.name} / {run_dir.name}", ""]
    first = next((r for r in records.values() if r.get("env")), next(iter(records.values())))
    env = first.get("env", {})
    ok, failed = int((cells["status"] == "ok").sum()), int((cells["status"] != "ok").sum())
    baselines = int((cells["kind"] == "baseline").sum())
    sections += [
        f"- cells: {len(cells)} ({ok} ok, {failed} failed), of which {baselines} baseline cells",
        f"- device: {env.get('device', '?')} ({env.get('device_name', '?')}), dtype {env.get('dtype', '?')}, "
        f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, commit {first.get('commit', '?')}",
        f"- generation: max_new_tokens {first['cell']['generation']['max_new_tokens']}, "
        f"temperature {first['cell']['generation']['temperature']}, seed {first['cell']['generation']['seed']}",
        f"- speedups are paired against: {PAIRED_AGAINST}; interval: 95% bootstrap over prompts",
        "",
    ]
    if not groups.empty:
        groups = groups.sort_values(["prompt_set", "speedup"], ascending=[True, False])
        groups["speedup_ci"] = groups.apply(
            lambda r: f"{r.speedup:.2f} [{r.speedup_low:.2f}, {r.speedup_high:.2f}]", axis=1)
        sections += ["## Speedup by strategy and prompt set", "", markdown_table(groups, {
            "strategy": "strategy", "params": "params", "prompt_set": "prompt set", "prompts": "prompts",
            "speedup_ci": "speedup (95% CI)", "tau": "τ", "alpha": "α", "cost_speedup": "cost speedup",
            "bound": "bound", "efficiency": "efficiency", "strategy_ms_per_token": "ms/token",
            "baseline_ms_per_token": "baseline ms/token", "match_rate": "token match",
        }), ""]
        pivot = groups.pivot_table(index=["strategy", "params"], columns="prompt_set", values="speedup")
        pivot["mean"] = pivot.mean(axis=1)
        sections += ["## Speedup overview (strategy x prompt set)", "",
                     markdown_table(pivot.reset_index(), {c: str(c) for c in pivot.reset_index().columns}), ""]
        sections += ["## Best configuration per strategy", "", markdown_table(best_per_strategy(groups), {
            "strategy": "strategy", "params": "best params", "speedup": "mean speedup", "cost_speedup": "mean cost speedup",
        }), ""]
        plot_speedups(groups, run_dir / "speedup.png")
        sections += ["![speedup](speedup.png)", ""]
        spec_bench = spec_bench_table(records)
        if spec_bench is not None:
            sections += ["## Spec-Bench", "",
                         "Speedup (ratio of mean wall times, 95% bootstrap interval) per Spec-Bench task; "
                         "multi-turn conversation pools the MT-bench categories; multi-turn prompts are run turn by turn.",
                         "", spec_bench, ""]
    correctness = cells[cells["kind"] == "strategy"].groupby("strategy").agg(
        cells=("cell_id", "count"), failed=("status", lambda s: int((s != "ok").sum())),
        match_rate=("match_rate", "mean") if "match_rate" in cells else ("cell_id", "count"),
    ).reset_index()
    sections += ["## Correctness", "", markdown_table(correctness, {
        "strategy": "strategy", "cells": "cells", "failed": "failed", "match_rate": "token match (mean over cells)",
    }), ""]
    failures = cells[cells["status"] != "ok"]
    if not failures.empty:
        sections += [f"### Failed cells ({len(failures)})", "", markdown_table(failures, {
            "cell_id": "cell", "kind": "kind", "strategy": "strategy", "params": "params", "prompt_set": "prompt set",
            "shard": "shard", "error": "error"}), ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(sections))
    return report


def spec_bench_table(records: dict[str, dict[str, Any]]) -> str | None:
    """Spec-Bench's table (per-task speedups, mean accepted tokens, overall) when the prompts carry its categories."""
    known = {category for categories in SPEC_BENCH_COLUMNS.values() for category in categories}
    rows = []
    for (target, strategy, params, prompt_set), prompts in grouped_prompts(records).items():
        categories = {prompt["category"] for prompt in prompts}
        if not categories & known:
            continue
        row = {"strategy": strategy, "params": params, "prompt_set": prompt_set}
        for column, members in SPEC_BENCH_COLUMNS.items():
            subset = [prompt for prompt in prompts if prompt["category"] in members]
            row[column] = _speedup_cell(summarize(subset)) if subset else "-"
        for category in sorted(categories - known):
            row[category] = _speedup_cell(summarize([p for p in prompts if p["category"] == category]))
        overall = summarize(prompts)
        row["Mean accepted tokens"] = overall["tau"]
        row["Overall"] = _speedup_cell(overall)
        rows.append(row)
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    columns = {"strategy": "strategy", "params": "params", "prompt_set": "prompt set"}
    columns.update({name: name for name in frame.columns if name not in columns})
    return markdown_table(frame.fillna("-"), columns)


def _speedup_cell(summary: dict[str, Any]) -> str:
    return f"{summary['speedup']:.2f}x [{summary['speedup_low']:.2f}, {summary['speedup_high']:.2f}]"


def best_per_strategy(groups: pd.DataFrame) -> pd.DataFrame:
    """For each strategy, the params with the highest speedup averaged over prompt sets."""
    means = groups.groupby(["strategy", "params"], as_index=False)[["speedup", "cost_speedup"]].mean()
    return means.loc[means.groupby("strategy")["speedup"].idxmax()].sort_values("speedup", ascending=False)


def plot_speedups(groups: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of speedup with 95% intervals, one per (strategy, params, prompt set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.strategy} {r.params} | {r.prompt_set}" for r in groups.itertuples()]
    height = max(2.5, 0.35 * len(labels) + 1)
    fig, ax = plt.subplots(figsize=(9, height))
    errors = [groups["speedup"] - groups["speedup_low"], groups["speedup_high"] - groups["speedup"]]
    ax.barh(range(len(labels)), groups["speedup"], xerr=errors, color="#4c78a8", capsize=3)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock speedup over autoregressive (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
