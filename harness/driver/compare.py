"""A leaderboard across run directories (``specsweep compare``), Spec-Bench style.

Rows are a method (strategy and its resolved params) on a target in one run; ``--by`` chooses the columns:

- ``category`` (default): the speedup per prompt category (Spec-Bench's tasks when the prompts carry its
  categories, else per prompt set), then mean accepted tokens (τ) and the overall speedup;
- ``target``: the overall speedup per target (rows are methods);
- ``strategy``: the best overall speedup of each strategy (rows are targets);
- ``batch``: the overall speedup per batch size (rows are methods; ``run.batch_size`` and grids over it);
- ``published``: each published ranking shipped with specsweep (Spec-Bench's leaderboards, EAGLE-3's table;
  ``harness.core.published``) beside the run's: per published method that specsweep implements, its published
  speedup, τ and rank, and the run's best cell of that strategy with its speedup, τ and rank; ``moved`` is the
  published rank minus the run's (both among the methods present in both), so every inversion shows.

Every speedup is the run's own paired throughput ratio (``harness.core.metrics``). Runs measured on different
device models are not comparable in wall time: when the rows span more than one device name, each row names
its device and is marked. Every row names the dtype its target ran in (a bfloat16 run and a float32 run of
one model measure different machines' arithmetic), and rows in more than one dtype are marked too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.errors import ConfigError
from harness.core.metrics import summarize
from harness.core.published import published_rankings
from harness.core.records import PromptRecord
from harness.core.results import ResultStore
from harness.core.tables import markdown_table
from harness.driver.batch_report import batch_size_of, method_label
from harness.driver.report import SPEC_BENCH_COLUMNS, grouped_prompts, in_leaderboard, is_spec_bench_source

BY = ("category", "target", "strategy", "batch", "published")


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per (target, strategy, params) of a run: overall and per-category speedups, τ, device name."""
    records = ResultStore(run_dir).latest()
    if not records:
        raise ConfigError("compare", f"{run_dir} has no cell results", "pass results/<sweep>/<run> directories")
    devices = {r.device_name for r in records.values()}
    device = " / ".join(sorted(d for d in devices if d)) or "?"
    dtype = " / ".join(sorted({r.env.dtype for r in records.values() if r.env and r.env.dtype})) or "?"
    sampled = any(r.sampled for r in records.values())
    sources = {r.prompt_set: r.prompt_source for r in records.values()}
    pooled: dict[tuple, list[PromptRecord]] = {}
    for (target, strategy, params, prompt_set), (_, prompts) in grouped_prompts(records).items():
        if not in_leaderboard(strategy):  # an instrument (the synthetic oracle) ranks with no method
            continue
        spec_bench = is_spec_bench_source(sources[prompt_set])
        pooled.setdefault((target, strategy, params), []).extend(
            dataclasses.replace(prompt, category=(spec_bench and spec_bench_task(prompt.category)) or prompt_set)
            for prompt in prompts)
    rows = []
    for (target, strategy, params), prompts in pooled.items():
        overall = summarize(prompts, sampled=sampled)
        row = {"run": f"{run_dir.parent.name}/{run_dir.name}", "device": device, "dtype": dtype, "target": target,
               "strategy": strategy, "params": params, "τ": overall["tau"], "overall": overall["speedup"],
               "suspect": overall["timing_suspect"]}
        for category in sorted({prompt.category for prompt in prompts}):
            row[f"category:{category}"] = summarize([p for p in prompts if p.category == category])["speedup"]
        rows.append(row)
    return rows


def spec_bench_task(category: str | None) -> str | None:
    """Spec-Bench's task column for a prompt category (MT-bench categories pool into one), else None."""
    return next((task for task, members in SPEC_BENCH_COLUMNS.items() if category in members), None)


def leaderboard(run_dirs: list[Path], by: str = "category") -> pd.DataFrame:
    """The comparison table of ``run_dirs`` with columns chosen by ``by``."""
    if by not in BY:
        raise ConfigError("--by", f"unknown {by!r}", f"use one of {', '.join(BY)}")
    rows = [row for run_dir in run_dirs for row in run_rows(Path(run_dir))]
    frame = pd.DataFrame(rows)
    if by == "published":
        return beside_published(frame)
    mixed = frame["device"].nunique() > 1
    frame["method"] = frame["strategy"] + " " + frame["params"].where(frame["params"] != "-", "")
    if by == "category":
        categories = [c for c in frame.columns if c.startswith("category:")]
        ordered = [f"category:{task}" for task in SPEC_BENCH_COLUMNS if f"category:{task}" in categories]
        ordered += sorted(set(categories) - set(ordered))
        table = frame[["run", "device", "dtype", "target", "method", *ordered, "τ", "overall", "suspect"]]
        table = table.rename(columns={c: c.split(":", 1)[1] for c in ordered}).sort_values("overall", ascending=False)
    elif by == "batch":
        frame = frame.assign(batch=frame["params"].map(batch_size_of),
                             method=frame["strategy"] + " " + frame["params"].map(method_label).where(
                                 frame["params"] != "-", ""))
        table = frame.pivot_table(index=["run", "device", "dtype", "target", "method"], columns="batch",
                                  values="overall").reset_index()
        table.columns = [f"B={column}" if isinstance(column, (int, float)) else column for column in table.columns]
    elif by == "target":
        table = frame.pivot_table(index=["run", "device", "dtype", "method"], columns="target",
                                  values="overall").reset_index()
    else:
        best = frame.groupby(["run", "device", "dtype", "target", "strategy"], as_index=False)["overall"].max()
        table = best.pivot_table(index=["run", "device", "dtype", "target"], columns="strategy",
                                 values="overall").reset_index()
    if mixed:
        table = table.assign(device=table["device"] + " †")
    if frame["dtype"].nunique() > 1:
        table = table.assign(dtype=table["dtype"] + " ‡")
    return table.reset_index(drop=True)


def beside_published(frame: pd.DataFrame) -> pd.DataFrame:
    """For each published table and each (run, target): the published methods specsweep implements, with their
    published figures and rank, beside the run's best cell of that strategy, its figures and its rank."""
    best = frame.loc[frame.groupby(["run", "target", "strategy"])["overall"].idxmax()]
    rows = []
    for table in dict.fromkeys(entry.table for entry in published_rankings()):
        entries = [entry for entry in published_rankings() if entry.table == table and entry.strategy]
        for (run, target), ours in best.groupby(["run", "target"], sort=False):
            ours = ours.set_index("strategy")
            present = [entry for entry in entries if entry.strategy in ours.index]
            theirs = {entry.strategy: rank for rank, entry in enumerate(sorted(present, key=lambda e: e.rank), 1)}
            ranked = sorted(present, key=lambda e: -ours.loc[e.strategy, "overall"])
            mine = {entry.strategy: rank for rank, entry in enumerate(ranked, 1)}
            for entry in present:
                cell = ours.loc[entry.strategy]
                rows.append({"published": table, "method": entry.method, "published speedup": entry.speedup,
                             "published τ": entry.tau, "published rank": theirs[entry.strategy], "run": run,
                             "device": cell["device"], "dtype": cell["dtype"], "target": target,
                             "specsweep": f"{entry.strategy} {cell['params']}", "speedup": cell["overall"],
                             "τ": cell["τ"], "rank": mine[entry.strategy],
                             "moved": theirs[entry.strategy] - mine[entry.strategy]})
    columns = ["published", "method", "published speedup", "published τ", "published rank", "run", "device", "dtype",
               "target", "specsweep", "speedup", "τ", "rank", "moved"]
    return pd.DataFrame(rows, columns=columns)


def write_leaderboard(run_dirs: list[Path], out_dir: Path, by: str = "category") -> tuple[Path, Path]:
    """Write ``compare.md`` and ``compare.csv`` into ``out_dir``; return their paths."""
    table = leaderboard(run_dirs, by)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "compare.csv", out_dir / "compare.md"
    table.to_csv(csv_path, index=False)
    lines = [f"# specsweep compare ({len(run_dirs)} runs, by {by})", "", markdown_table(table, {c: str(c) for c in table.columns}), ""]
    if table["device"].astype(str).str.endswith("†").any():
        lines += ["† the rows were measured on different device models: compare their speedups, not their wall times "
                  "across devices.", ""]
    if table["dtype"].astype(str).str.endswith("‡").any():
        lines += ["‡ the rows ran their targets in different dtypes: a speedup depends on the dtype (on a CPU, a "
                  "several-token forward costs far less, relative to a one-token one, in bfloat16 than in float32).",
                  ""]
    md_path.write_text("\n".join(lines))
    return md_path, csv_path
