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


def grouped_prompts(records: dict[str, dict[str, Any]]) -> dict[tuple, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(params, paired prompt records) of ok strategy cells by (target, strategy, params label, prompt set),
    all shards pooled."""
    groups: dict[tuple, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for record in records.values():
        if record.get("status") != "ok" or record.get("kind", "strategy") != "strategy":
            continue
        cell = record["cell"]
        key = (cell["target"][0], cell["strategy"], params_label(cell["params"]), cell["prompt_set"]["name"])
        groups.setdefault(key, (cell["params"], []))[1].extend(record["prompts"])
    return groups


def group_rows(records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per (target, strategy, params, prompt set), pooling the prompts of all its shards."""
    rows = []
    for (target, strategy, params, prompt_set), (raw, prompts) in grouped_prompts(records).items():
        rows.append({"target": target, "strategy": strategy, "params": params, "prompt_set": prompt_set,
                     "params_raw": raw, "levels": level_summary(prompts), **summarize(prompts)})
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
    cells.to_csv(run_dir / "cells.csv", index=False)
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
        f"- prompt templates: {templates_line(records)}",
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
        cascade = cascade_section(groups, run_dir)
        if cascade:
            sections += cascade
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


def level_summary(prompts: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per cascade level: reviews, acceptance rate and tokens per review (τ of that level), pooled over prompts."""
    totals: dict[str, dict[str, float]] = {}
    for prompt in prompts:
        for turn in prompt["turns"]:
            for name, level in turn["strategy"].get("extras", {}).get("levels", {}).items():
                entry = totals.setdefault(name, {"reviews": 0, "proposed": 0, "accepted": 0})
                for key in entry:
                    entry[key] += level[key]
    return {name: {"reviews": t["reviews"],
                   "alpha": t["accepted"] / t["proposed"] if t["proposed"] else None,
                   "tau": (t["accepted"] + t["reviews"]) / t["reviews"] if t["reviews"] else None}
            for name, t in totals.items()}


def cascade_section(groups: pd.DataFrame, run_dir: Path) -> list[str]:
    """CS Drafting: best k-matrix vs best single-draft speculative, per-level τ/α, heatmaps over row 0."""
    cascades = groups[groups["strategy"] == "cascade"]
    if cascades.empty:
        return []
    means = groups.groupby(["strategy", "params"], as_index=False)[["speedup", "cost_speedup", "tau"]].mean()
    lines = ["## CS Drafting", ""]
    cascade_means = means[means["strategy"] == "cascade"]
    best_cost = cascade_means.loc[cascade_means["cost_speedup"].idxmax()]
    best_wall = cascade_means.loc[cascade_means["speedup"].idxmax()]
    lines.append(f"- best k-matrix by cost speedup: `{best_cost.params}`: cost speedup {best_cost.cost_speedup:.2f}, "
                 f"wall speedup {best_cost.speedup:.2f} (means over prompt sets)")
    lines.append(f"- best k-matrix by wall speedup: `{best_wall.params}`: wall speedup {best_wall.speedup:.2f}, "
                 f"cost speedup {best_wall.cost_speedup:.2f}")
    single = means[means["strategy"] == "speculative"]
    if not single.empty:
        best_single = single.loc[single["cost_speedup"].idxmax()]
        verdict = "beats" if best_cost.cost_speedup > best_single.cost_speedup else "does not beat"
        lines.append(f"- best single-draft speculative by cost speedup: `{best_single.params}`: "
                     f"{best_single.cost_speedup:.2f} (wall {best_single.speedup:.2f}); the best cascade {verdict} it")
    lines += ["", "Per-level acceptance of the best k-matrix (by cost), pooled over prompt sets:", ""]
    level_rows = []
    for _, row in cascades[cascades["params"] == best_cost.params].iterrows():
        for name, level in row["levels"].items():
            level_rows.append({"prompt_set": row["prompt_set"], "level": name, **level})
    lines += [markdown_table(pd.DataFrame(level_rows), {"prompt_set": "prompt set", "level": "reviewer",
                                                        "reviews": "reviews", "tau": "τ (tokens per review)",
                                                        "alpha": "α (accepted / proposed)"}), ""]
    figures = plot_kmatrix_heatmaps(cascades, run_dir)
    lines += [f"![{path.stem}]({path.name})" for path in figures] + [""]
    return lines


def plot_kmatrix_heatmaps(cascades: pd.DataFrame, run_dir: Path) -> list[Path]:
    """Heatmaps of mean cost and wall speedup over (k[0][0], k[0][1]), one per cascade family (drafts, MaG, lenience)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for params, frame in cascades.groupby("params"):
        raw = frame["params_raw"].iloc[0]
        if len(raw["k_matrix"][0]) < 2:
            continue
        family = f"drafts={'+'.join(raw['drafts']) or '-'}{'+MaG' if raw.get('use_mag') else ''}, " \
                 f"lenience={raw.get('lenience', 1.0)}"
        rows.append({"family": family, "k00": raw["k_matrix"][0][0], "k01": raw["k_matrix"][0][1],
                     "speedup": frame["speedup"].mean(), "cost_speedup": frame["cost_speedup"].mean()})
    if not rows:
        return []
    table = pd.DataFrame(rows)
    paths = []
    for index, (family, frame) in enumerate(table.groupby("family")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric in zip(axes, ("cost_speedup", "speedup")):
            grid = frame.pivot_table(index="k00", columns="k01", values=metric, aggfunc="max")
            image = ax.imshow(grid.values, cmap="viridis", origin="lower")
            ax.set_xticks(range(len(grid.columns)), grid.columns)
            ax.set_yticks(range(len(grid.index)), grid.index)
            ax.set_xlabel("k[0][1] (tokens from the second draft)")
            ax.set_ylabel("k[0][0] (tokens from the first draft)")
            ax.set_title(f"{'cost' if metric == 'cost_speedup' else 'wall'} speedup")
            for (i, j), value in pd.DataFrame(grid.values).stack().items():
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=9)
            fig.colorbar(image, ax=ax)
        fig.suptitle(family)
        fig.tight_layout()
        path = run_dir / f"kmatrix_heatmap_{index}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def templates_line(records: dict[str, dict[str, Any]]) -> str:
    """Which chat template each prompt set went through (``none`` for plain text), from the cell records."""
    used: dict[str, set[str]] = {}
    for record in records.values():
        if "template" in record:
            used.setdefault(record["cell"]["prompt_set"]["name"], set()).add(record["template"])
    return ", ".join(f"{name}: {' / '.join(sorted(labels))}" for name, labels in sorted(used.items())) or "-"


def spec_bench_table(records: dict[str, dict[str, Any]]) -> str | None:
    """Spec-Bench's table (per-task speedups, mean accepted tokens, overall) when the prompts carry its categories."""
    known = {category for categories in SPEC_BENCH_COLUMNS.values() for category in categories}
    sources = {r["cell"]["prompt_set"]["name"]: r["cell"]["prompt_set"]["source"] for r in records.values()}
    rows = []
    for (target, strategy, params, prompt_set), (_, prompts) in grouped_prompts(records).items():
        categories = {prompt["category"] for prompt in prompts}
        if sources[prompt_set].startswith(("zoo:", "hf:")) or not categories & known:
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
