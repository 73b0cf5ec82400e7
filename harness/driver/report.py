"""Reports of a run directory: ``cells.csv``, ``report.md`` and PNG plots, from ``cells.jsonl``.

Rows of the report group a strategy configuration over all shards of a prompt
set, per target; every speedup is a throughput ratio against the autoregressive
baseline on the same prompts (see ``harness.core.metrics``). The report names the
models, resolves every strategy's params (defaults shown), defines its metrics
in a glossary, and marks timings the drift guard does not trust. The main table
is also written as ``summary.csv`` and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.core.errors import ConfigError
from harness.core.metrics import MAX_CPU_WAIT, summarize, turn_outcomes
from harness.core.records import CellRecord, Environment, PromptRecord
from harness.core.results import ResultStore
from harness.core.tables import ReportView, fmt, markdown_table, params_label
from harness.driver.batch_report import batch_size_section, with_batch_size
from strategies import Strategy, parse_params, strategy_class

PAIRED_AGAINST = {
    "interleaved": "the autoregressive baseline (specsweep's own decoding loop) run inside each cell on the same "
                   "prompts, turn by turn back to back with the strategy on the same worker, alternating which goes "
                   "first",
    "shared": "the autoregressive baseline (specsweep's own decoding loop) on the same prompts, target and device "
              "model, run once per prompt shard and shared by every strategy on that shard",
}
MIN_PROMPTS_FOR_INTERVAL = 8
GLOSSARY = [
    "- **speedup**: (strategy tokens / strategy seconds) / (baseline tokens / baseline seconds), pooled over the "
    "group's prompts; 95% interval by bootstrap over prompts.",
    "- **τ** (mean accepted tokens): new tokens / target verification steps.",
    "- **α** (acceptance rate): accepted draft tokens / drafted tokens.",
    "- **cost speedup**: baseline cost / strategy cost in CS Drafting's parameter-count units "
    "(each forward costs its model's parameters × tokens).",
    "- **bound**: Leviathan et al.'s ideal speedup (1 - α^(γ+1)) / (1 - α) / (1 + draft seconds per step / target "
    "seconds per 1-token step), with γ the mean drafted tokens per step; none for trees.",
    "- **efficiency**: speedup / bound.",
    "- **token match**: share of turns whose tokens equal the baseline's; n/a under sampling.",
    "- **timing**: *suspect* when the worker's threads waited for a CPU more than `run.max_cpu_wait` of their "
    "runnable time on either side (other work contended for the machine), when the target's 1-token step (probed "
    "after every run of each side) differs between the sides by more than `run.drift_tolerance` and by more than 3 "
    "standard errors of the probe's own noise in the cell, under shared pairing when its prompt prefill (the same "
    "tokens on both sides) differs per token by more than twice the tolerance, or when speedup exceeds τ × "
    "(baseline 1-token step time / strategy verification-step time), which no strategy can beat.",
    "- **pos i** (conditional acceptance): steps that accepted ≥ i drafted tokens / steps that drafted ≥ i and "
    "accepted ≥ i - 1.",
    "- **time split**: draft = Σ non-target forward seconds, verify = Σ target decode seconds, prefill = the "
    "target's prompt prefill, other = wall - the three; each over the strategy side's wall seconds.",
    "",
    "How each number is measured (pairing, timing, the drift guard, the lossless check): specsweep's README, "
    "Concepts, *Metrics* to *Drift guard*; the formulas are in `harness/core/metrics.py`.",
]
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_COLUMNS = {
    "Multi-turn conversation": MT_BENCH,
    "Translation": ("translation",),
    "Summarization": ("summarization",),
    "QA": ("qa",),
    "Math reasoning": ("math_reasoning",),
    "RAG": ("rag",),
}


def config_label(record: CellRecord, resolve: bool = True) -> str:
    """The cell's parameters, the content keys of the trained artefacts it used (so that cells run with a
    retrained head or draft are never pooled with those of the earlier one) and its batch size when above 1."""
    params = resolved_params(record.strategy, record.params) if resolve else record.params
    artifacts = record.cell.get("artifacts") or {}
    suffix = "; ".join(f"{name}@{key[:8]}" for name, key in sorted(artifacts.items()))
    label = f"{params_label(params)} [{suffix}]" if suffix else params_label(params)
    return with_batch_size(label, record.generation.get("batch_size", 1))


def cell_rows(records: dict[str, CellRecord]) -> pd.DataFrame:
    """One row per cell record, with its metrics."""
    rows = []
    for cell_id, record in records.items():
        row = {
            "cell_id": cell_id,
            "kind": record.kind,
            "status": record.status,
            "target": record.target_name,
            "strategy": record.strategy,
            "params": config_label(record, resolve=False),
            "prompt_set": record.prompt_set,
            "shard": record.cell["shard"],
            "device": record.env.device if record.env else "",
            "device_name": record.device_name,
            "dtype": record.env.dtype if record.env else "",
            "worker": record.worker or "",
            "error": record.error or "",
            "paired_with": record.paired_with.get("cell_id", ""),
        }
        if record.ok and record.kind == "strategy":
            metrics = summarize(record.prompts, sampled=record.sampled, drift_tolerance=drift_tolerance(record),
                                max_cpu_wait=max_cpu_wait(record))
            metrics.pop("accepted_histogram", None)
            positions = metrics.pop("position_acceptance", None) or []
            row.update(metrics, **time_columns(metrics.pop("time_split", None)),
                       **{f"accept_p{index + 1}": rate for index, rate in enumerate(positions[:4])})
            row.pop("time_split", None)
        elif record.kind == "strategy" and record.prompts and not record.sampled:
            row.update(turn_outcomes(record.prompts))  # a cell failed on a real divergence keeps its counts
        rows.append(row)
    return pd.DataFrame(rows)


def time_columns(split: dict[str, float] | None) -> dict[str, float]:
    """A time split (``harness.core.metrics.time_split``) as flat ``time_<part>`` columns."""
    return {f"time_{part}": share for part, share in (split or {}).items()}


def drift_tolerance(record: CellRecord) -> float:
    return float(record.timing.get("tolerance", 0.10))


def max_cpu_wait(record: CellRecord) -> float:
    return float(record.timing.get("max_cpu_wait", MAX_CPU_WAIT))


def grouped_prompts(records: dict[str, CellRecord]) -> dict[tuple, tuple[dict[str, Any], list[PromptRecord]]]:
    """(params, paired prompt records) of ok strategy cells by (target, strategy, params label, prompt set),
    all shards pooled."""
    groups: dict[tuple, tuple[dict[str, Any], list[PromptRecord]]] = {}
    for record in records.values():
        if not record.ok or record.kind != "strategy":
            continue
        params = resolved_params(record.strategy, record.params)
        key = (record.target_name, record.strategy, config_label(record), record.prompt_set)
        groups.setdefault(key, (params, []))[1].extend(record.prompts)
    return groups


def resolved_params(strategy: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the strategy's defaults filled in (as given when the strategy is not registered here)."""
    try:
        return parse_params(strategy, params, strategy).as_dict()
    except Exception:  # a plugin strategy this process has not imported
        return dict(params)


def known_strategy(name: str) -> type[Strategy] | None:
    """The class registered as ``name``, or None for a plugin strategy this process has not imported."""
    try:
        return strategy_class(name)
    except ConfigError:
        return None


def in_leaderboard(strategy: str) -> bool:
    """Whether ``strategy``'s rows rank with the methods (the synthetic oracle's do not: it has its own section)."""
    cls = known_strategy(strategy)
    return cls is None or cls.leaderboard


def method_stats(strategy: str, prompts: list[PromptRecord]) -> dict[str, Any]:
    """The method's own pooled statistics (``Strategy.pooled_stats``) for a group's prompts."""
    cls = known_strategy(strategy)
    return cls.pooled_stats(prompts) if cls is not None else {}


def method_sections(view: ReportView) -> list[str]:
    """Each method's own report section (``Strategy.report_section``), once per section, in the table's order."""
    sections = []
    for name in dict.fromkeys(view.groups["strategy"]):
        cls = known_strategy(name)
        if cls is not None and cls.report_section is not None and cls.report_section not in sections:
            sections.append(cls.report_section)
    return [line for section in sections for line in section(view)]


def group_rows(records: dict[str, CellRecord]) -> pd.DataFrame:
    """One row per (target, strategy, params, prompt set), pooling the prompts of all its shards."""
    rows = []
    sampled = any(record.sampled for record in records.values())
    tolerance = max((drift_tolerance(record) for record in records.values()), default=0.10)
    wait_limit = max((max_cpu_wait(record) for record in records.values()), default=MAX_CPU_WAIT)
    batch_sizes = {(record.target_name, record.strategy, config_label(record), record.prompt_set):
                   record.generation.get("batch_size", 1) for record in records.values()}
    for key, (raw, prompts) in grouped_prompts(records).items():
        target, strategy, params, prompt_set = key
        summary = summarize(prompts, sampled=sampled, drift_tolerance=tolerance, max_cpu_wait=wait_limit)
        rows.append({"target": target, "strategy": strategy, "params": params, "prompt_set": prompt_set,
                     "params_raw": raw, "batch_size": batch_sizes[key], **method_stats(strategy, prompts), **summary,
                     **time_columns(summary.get("time_split"))})
    return pd.DataFrame(rows)


def write_report(run_dir: str | Path, store: ResultStore | None = None) -> Path:
    """Write ``cells.csv``, ``summary.csv``/``.json``, ``report.md`` and plots into ``run_dir``; return the report.
    ``store`` (``run_dir``'s by default) is left holding the lines it could not read."""
    run_dir = Path(run_dir)
    store = store or ResultStore(run_dir)
    records = store.latest()
    if not records:
        raise ConfigError("RUN_DIR", no_results_reason(store), "run the sweep into it, or pass another run directory")
    cells = cell_rows(records)
    cells.to_csv(run_dir / "cells.csv", index=False)
    groups = group_rows(records)
    multi_target = cells["target"].nunique() > 1
    first = next((r for r in records.values() if r.env), next(iter(records.values())))
    env = first.env or Environment()
    generation = first.generation
    sampled = any(record.sampled for record in records.values())
    ok, failed = int((cells["status"] == "ok").sum()), int((cells["status"] != "ok").sum())
    baselines = int((cells["kind"] == "baseline").sum())
    pairing = generation.get("pairing", "shared")
    sections = [f"# specsweep report: {sweep_name(run_dir, records)} / {run_dir.name}", ""]
    sections += [
        f"- cells: {len(cells)} ({ok} ok, {failed} failed), of which {baselines} baseline cells",
        f"- device: {env.device or '?'} ({env.device_name or '?'}), dtype {env.dtype or '?'}, "
        f"torch {env.torch or '?'}, transformers {env.transformers or '?'}, commit {first.commit or '?'}",
        f"- generation: max_new_tokens {generation['max_new_tokens']}, temperature {generation['temperature']}, "
        f"seed {generation['seed']}, repeats {generation.get('repeats', 1)} (median kept)",
        f"- speedups are paired against: {PAIRED_AGAINST.get(pairing, pairing)}; interval: 95% bootstrap over prompts",
        f"- prompt templates: {templates_line(records)}",
        "",
        "## Models", "", models_table(records), "",
    ]
    if store.unreadable:
        listed = "; ".join(f"line {line.number}: {line.reason}" for line in store.unreadable[:5])
        sections += [f"> **Warning:** {len(store.unreadable)} line(s) of cells.jsonl could not be read and are left "
                     f"out of this report ({listed}). Rerun their cells with `specsweep run --resume RUN_DIR`.", ""]
    columns = {"strategy": "strategy", "params": "params", "prompt_set": "prompt set", "prompts": "prompts",
               "speedup_ci": "speedup (95% CI)", "tau": "τ", "alpha": "α", "drafted_per_step": "drafted/step",
               "cost_speedup": "cost speedup", "bound": "bound", "efficiency": "efficiency",
               "strategy_ms_per_token": "ms/token", "baseline_ms_per_token": "baseline ms/token",
               "match": "token match", "timing": "timing"}
    if multi_target:
        columns = {"target": "target", **columns}
    instruments = groups.iloc[0:0] if groups.empty else groups[~groups["strategy"].map(in_leaderboard)]
    groups = groups if groups.empty else groups[groups["strategy"].map(in_leaderboard)]
    if groups.empty and not instruments.empty:
        sections += method_sections(ReportView(instruments, records, run_dir, multi_target, config_label))
    if not groups.empty:
        groups = groups.sort_values(["target", "prompt_set", "speedup"], ascending=[True, True, False])
        groups["speedup_ci"] = groups.apply(
            lambda r: f"{r.speedup:.2f} [{r.speedup_low:.2f}, {r.speedup_high:.2f}]", axis=1)
        groups["match"] = [("n/a (sampled)" if sampled else fmt(rate)) + (" (lossy)" if is_lossy(name) else "")
                           for rate, name in zip(groups["match_rate"], groups["strategy"])]
        groups["timing"] = groups["timing_suspect"].map(lambda v: "SUSPECT" if v else "ok")
        write_summary(groups, columns, run_dir)
        sections += ["## Speedup by strategy and prompt set", "", markdown_table(groups, columns), ""]
        small = groups[groups["prompts"] < MIN_PROMPTS_FOR_INTERVAL]
        if not small.empty:
            sections += [f"> **Warning:** {len(small)} row(s) rest on fewer than {MIN_PROMPTS_FOR_INTERVAL} prompts; "
                         "their intervals say little. Run more prompts per set.", ""]
        suspects = groups[groups["timing_suspect"]]
        if not suspects.empty:
            sections += [f"> **Warning:** {len(suspects)} row(s) have suspect timings (below); rerun them with "
                         "`specsweep run --resume RUN_DIR --retry-suspect` on a quiet machine.", ""]
            sections += [markdown_table(suspects, {**({"target": "target"} if multi_target else {}),
                                                   "strategy": "strategy", "params": "params",
                                                   "prompt_set": "prompt set", "timing_note": "why"}), ""]
        index = ["target", "strategy", "params"] if multi_target else ["strategy", "params"]
        pivot = groups.pivot_table(index=index, columns="prompt_set", values="speedup")
        pivot["mean"] = pivot.mean(axis=1)
        sections += ["## Speedup overview (strategy x prompt set)", "",
                     markdown_table(pivot.reset_index(), {c: str(c) for c in pivot.reset_index().columns}), ""]
        best_columns = {"strategy": "strategy", "params": "best params", "speedup": "mean speedup",
                        "cost_speedup": "mean cost speedup", "verdict": "vs runner-up"}
        sections += ["## Best configuration per strategy", "", markdown_table(
            best_per_strategy(groups), {**({"target": "target"} if multi_target else {}), **best_columns}), ""]
        plot_speedups(groups, run_dir / "speedup.png", multi_target)
        sections += ["![speedup](speedup.png)", ""]
        if plot_acceptance_vs_gamma(groups, run_dir / "acceptance_vs_gamma.png"):
            sections += ["![α and τ against γ](acceptance_vs_gamma.png)", ""]
        sections += acceptance_section(groups)
        sections += batch_size_section(groups, run_dir, multi_target)
        sections += time_split_section(groups, multi_target)
        sections += method_sections(ReportView(pd.concat([groups, instruments]), records, run_dir, multi_target,
                                               config_label))
        spec_bench = spec_bench_table(records, multi_target)
        if spec_bench is not None:
            sections += ["## Spec-Bench", "",
                         "Speedup (throughput ratio, 95% bootstrap interval) per Spec-Bench task; multi-turn "
                         "conversation pools the MT-bench categories; multi-turn prompts are run turn by turn.",
                         "", spec_bench, ""]
    sections += correctness_section(cells, sampled)
    failures = cells[cells["status"] != "ok"]
    if not failures.empty:
        sections += [f"### Failed cells ({len(failures)})", "", markdown_table(failures, {
            "cell_id": "cell", "kind": "kind", "strategy": "strategy", "params": "params", "prompt_set": "prompt set",
            "shard": "shard", "error": "error"}), ""]
    sections += ["## Glossary", "", *GLOSSARY, ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(sections))
    return report


def no_results_reason(store: ResultStore) -> str:
    """Why ``store`` has no readable record: the file is missing, empty, or has only unreadable lines."""
    if not store.path.exists():
        return f"{store.path} is missing: the run recorded no cell yet"
    if not store.unreadable:
        return f"{store.path} is empty: the run recorded no cell yet"
    first = store.unreadable[0]
    return (f"{store.path}: none of its {len(store.unreadable)} line(s) is a cell record (line {first.number}: "
            f"{first.reason})")


def sweep_name(run_dir: Path, records: dict[str, CellRecord]) -> str:
    """The sweep's name: from the run's ``sweep.yaml``, else the parent directory."""
    sweep_file = run_dir / "sweep.yaml"
    if sweep_file.exists():
        try:
            name = (yaml.safe_load(sweep_file.read_text()) or {}).get("name")
        except yaml.YAMLError:
            name = None
        if isinstance(name, str) and name:
            return name
    return run_dir.resolve().parent.name


def models_table(records: dict[str, CellRecord]) -> str:
    """Each model the run used: role, id, revision, dtype, parameters, and the chat template of its prompts."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records.values():
        cell = record.cell
        parameters = record.env.parameters if record.env else {}
        name, spec = cell["target"]
        entry = rows.setdefault(("target", name), {"role": "target", "name": name, "id": spec.get("id"),
                                                   "revision": spec.get("revision", "-"), "dtype": spec.get("dtype"),
                                                   "parameters": None, "template": set()})
        entry["parameters"] = entry["parameters"] or parameters.get("target")
        if record.template:
            entry["template"].add(record.template)
        for draft, draft_spec in cell.get("drafts", {}).items():
            draft_entry = rows.setdefault(("draft", draft), {
                "role": "draft", "name": draft, "id": draft_spec.get("id"), "revision": draft_spec.get("revision", "-"),
                "dtype": draft_spec.get("dtype"), "parameters": None, "template": set()})
            draft_entry["parameters"] = draft_entry["parameters"] or parameters.get(f"draft:{draft}")
    frame = pd.DataFrame([{**row, "parameters": f"{row['parameters'] / 1e6:.1f}M" if row["parameters"] else "-",
                           "template": " / ".join(sorted(row["template"])) or "-"} for row in rows.values()])
    return markdown_table(frame, {"role": "role", "name": "name", "id": "id", "revision": "revision",
                                  "dtype": "dtype", "parameters": "parameters", "template": "chat template"})


def write_summary(groups: pd.DataFrame, columns: dict[str, str], run_dir: Path) -> None:
    """The main table as ``summary.csv`` and ``summary.json`` (numbers unrounded)."""
    keep = [name for name in ("target", "strategy", "params", "prompt_set", "prompts", "turns", "new_tokens", "speedup",
                              "speedup_low", "speedup_high", "tau", "alpha", "drafted_per_step", "cost_speedup",
                              "bound", "efficiency", "strategy_ms_per_token", "baseline_ms_per_token", "match_rate",
                              "baseline_probe_ms", "strategy_probe_ms", "step_drift", "prefill_drift",
                              "speedup_ceiling", "timing_suspect",
                              "timing_note", "time_draft", "time_verify", "time_prefill", "time_other")
            if name in groups.columns]
    table = groups[keep]
    table.to_csv(run_dir / "summary.csv", index=False)
    rows = json.loads(table.to_json(orient="records"))
    (run_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")


def correctness_section(cells: pd.DataFrame, sampled: bool) -> list[str]:
    """Per strategy: cells, failed cells, the mean token match of the cells that ran and, under greedy decoding,
    its turns by outcome: exact, tie-divergent and real divergences (``harness.core.divergence``), with the mean
    number of tokens before the first divergence."""
    strategy_cells = cells[cells["kind"] == "strategy"]
    if strategy_cells.empty:
        return []
    rows = []
    for strategy, frame in strategy_cells.groupby("strategy"):
        ran = frame[frame["status"] == "ok"]
        if sampled:
            match = "n/a (sampled)"
        elif ran.empty or "match_rate" not in ran:
            match = "-"
        else:
            match = fmt(float(ran["match_rate"].mean()))
        row = {"strategy": strategy, "cells": len(frame), "failed": int((frame["status"] != "ok").sum()),
               "match": match, "kind": "lossy" if is_lossy(strategy) else "lossless"}
        if not sampled and "exact_turns" in frame:
            counts = {name: int(frame[name].fillna(0).sum()) for name in (
                "exact_turns", "tie_turns", "real_divergences", "unclassified_divergences")}
            divergent = frame["tie_turns"].fillna(0) + frame["real_divergences"].fillna(0) + \
                frame["unclassified_divergences"].fillna(0)
            weighted = (frame["tokens_to_divergence"].fillna(0) * divergent).sum()
            row.update(counts, tokens_to_divergence=fmt(weighted / divergent.sum()) if divergent.sum() else "-")
        rows.append(row)
    columns = {"strategy": "strategy", "kind": "kind", "cells": "cells", "failed": "failed",
               "match": "token match with the dense baseline (mean over cells that ran)"}
    if any("exact_turns" in row for row in rows):
        columns.update({"exact_turns": "exact turns", "tie_turns": "tie-divergent turns",
                        "real_divergences": "real divergences", "unclassified_divergences": "unclassified",
                        "tokens_to_divergence": "mean tokens to first divergence"})
    lines = ["## Correctness", "", markdown_table(pd.DataFrame(rows), columns), ""]
    if any(row.get("tie_turns") or row.get("real_divergences") for row in rows):
        lines += ["Outside float32 a several-token verification rounds differently from one-token steps, so a "
                  "lossless strategy may leave the baseline where the target's top two tokens are tied within the "
                  "dtype's rounding. Each such turn is re-scored at its first divergence in float32: a *tie* is a "
                  "float32 gap between the two tokens within the dtype's rounding bound (the larger of two units in "
                  "the last place at that logit and twice the dtype's largest error on the two logits over its "
                  "decode paths: the whole prefix, and its last 1, 4 and 8 tokens after a cache of the rest); "
                  "anything else is a *real* divergence and fails its cell. *Unclassified*: divergences that are not classified: those of lossy "
                  "strategies, and float32 mismatches, each of which fails its cell outright.", ""]
    if any(row["kind"] == "lossy" for row in rows):
        lines += ["Lossy strategies decode with a modified target (layer skipping); their token match measures how far "
                  "they drift from the dense model, and a mismatch does not fail their cells.", ""]
    return lines


def is_lossy(strategy: str) -> bool:
    """Whether ``strategy`` decodes with a modified target (False for a strategy this process does not know)."""
    cls = known_strategy(strategy)
    return cls is not None and cls.lossy


def acceptance_section(groups: pd.DataFrame) -> list[str]:
    """Per-position conditional acceptance and the accepted-length histogram of every chain-drafting row."""
    rows = []
    for row in groups.itertuples():
        rates = [rate for rate in (row.position_acceptance or [])]
        while rates and rates[-1] is None:
            rates.pop()
        if not rates:
            continue
        entry = {"strategy": row.strategy, "params": row.params, "prompt_set": row.prompt_set,
                 "histogram": " ".join(f"{length}:{count}" for length, count in row.accepted_histogram.items())}
        entry.update({f"p{index + 1}": fmt(rate) for index, rate in enumerate(rates)})
        rows.append(entry)
    if not rows:
        return []
    frame = pd.DataFrame(rows).fillna("-")
    positions = [column for column in frame.columns if column.startswith("p") and column[1:].isdigit()]
    columns = {"strategy": "strategy", "params": "params", "prompt_set": "prompt set",
               **{name: f"pos {name[1:]}" for name in positions}, "histogram": "accepted length: steps"}
    return ["## Acceptance by draft position", "",
            "pos i: the rate at which the i-th drafted token is accepted, given that the (i-1)-th was (chain drafts; "
            "tree drafts have no single position). Accepted length: how many drafting steps accepted that many "
            "tokens.", "", markdown_table(frame, columns), ""]


def time_split_section(groups: pd.DataFrame, multi_target: bool) -> list[str]:
    """Where each row's strategy-side wall time went: drafting, target verification, prefill, other."""
    if "time_verify" not in groups.columns:
        return []
    frame = groups.dropna(subset=["time_verify"]).copy()
    if frame.empty:
        return []
    for part in ("draft", "verify", "prefill", "other"):
        frame[f"{part}_share"] = frame[f"time_{part}"].map(lambda share: f"{100 * share:.0f} %")
    columns = {**({"target": "target"} if multi_target else {}), "strategy": "strategy", "params": "params",
               "prompt_set": "prompt set", "draft_share": "draft", "verify_share": "verify (target)",
               "prefill_share": "prefill (target)", "other_share": "other (host)"}
    return ["## Where the time goes", "",
            "Shares of the strategy side's wall time: every non-target forward (draft), the target's decode forwards "
            "(verify), its prompt prefill, and the rest (host work between forwards).", "",
            markdown_table(frame, columns), ""]


def templates_line(records: dict[str, CellRecord]) -> str:
    """Which chat template each prompt set went through (``none`` for plain text), from the cell records."""
    used: dict[str, set[str]] = {}
    for record in records.values():
        if record.template:
            used.setdefault(record.prompt_set, set()).add(record.template)
    return ", ".join(f"{name}: {' / '.join(sorted(labels))}" for name, labels in sorted(used.items())) or "-"


def spec_bench_table(records: dict[str, CellRecord], multi_target: bool = False) -> str | None:
    """Spec-Bench's table (per-task speedups, mean accepted tokens, overall) when the prompts carry its categories."""
    known = {category for categories in SPEC_BENCH_COLUMNS.values() for category in categories}
    sources = {r.prompt_set: r.prompt_source for r in records.values()}
    rows = []
    for (target, strategy, params, prompt_set), (_, prompts) in grouped_prompts(records).items():
        categories = {prompt.category for prompt in prompts}
        if not is_spec_bench_source(sources[prompt_set]) or not categories & known or not in_leaderboard(strategy):
            continue
        row = {"target": target, "strategy": strategy, "params": params, "prompt_set": prompt_set}
        for column, members in SPEC_BENCH_COLUMNS.items():
            subset = [prompt for prompt in prompts if prompt.category in members]
            row[column] = _speedup_cell(summarize(subset)) if subset else "-"
        for category in sorted(categories - known):
            row[category] = _speedup_cell(summarize([p for p in prompts if p.category == category]))
        overall = summarize(prompts)
        row["Mean accepted tokens"] = overall["tau"]
        row["Overall"] = _speedup_cell(overall)
        rows.append(row)
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    columns = {**({"target": "target"} if multi_target else {}),
               "strategy": "strategy", "params": "params", "prompt_set": "prompt set"}
    columns.update({name: name for name in frame.columns if name not in columns and name != "target"})
    return markdown_table(frame.fillna("-"), columns)



def is_spec_bench_source(source: str) -> bool:
    """Whether a prompt set's categories can be Spec-Bench's (zoo domains and HF datasets are not)."""
    return not source.startswith(("zoo:", "hf:"))


def _speedup_cell(summary: dict[str, Any]) -> str:
    return f"{summary['speedup']:.2f}x [{summary['speedup_low']:.2f}, {summary['speedup_high']:.2f}]"


def best_per_strategy(groups: pd.DataFrame) -> pd.DataFrame:
    """For each (target and) strategy, the params with the highest speedup averaged over prompt sets; *tied* when
    the runner-up's mean interval overlaps the best one's."""
    keys = ["target", "strategy"]
    means = groups.groupby([*keys, "params"], as_index=False)[
        ["speedup", "cost_speedup", "speedup_low", "speedup_high"]].mean()
    rows = []
    for _, frame in means.groupby(keys):
        ordered = frame.sort_values("speedup", ascending=False)
        best = ordered.iloc[0].to_dict()
        if len(ordered) == 1:
            best["verdict"] = "only configuration"
        else:
            second = ordered.iloc[1]
            overlap = second["speedup_high"] >= best["speedup_low"]
            best["verdict"] = f"tied with {second['params']}" if overlap else "better (intervals apart)"
        rows.append(best)
    return pd.DataFrame(rows).sort_values("speedup", ascending=False)


def plot_speedups(groups: pd.DataFrame, path: Path, multi_target: bool = False) -> None:
    """Speedup bars with 95% intervals, one panel per prompt set (and target), one colour per strategy, a legend;
    bars are labelled by their params, so the figure stays readable with many configurations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facets = [(key, frame) for key, frame in groups.groupby(["target", "prompt_set"] if multi_target else ["prompt_set"])]
    strategies = sorted(groups["strategy"].unique())
    colours = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(strategies)}
    tallest = max(len(frame) for _, frame in facets)
    fig, axes = plt.subplots(1, len(facets), figsize=(6.5 * len(facets), max(2.5, 0.28 * tallest + 1.5)), squeeze=False)
    for ax, (key, frame) in zip(axes[0], facets):
        frame = frame.sort_values("speedup")
        labels = [short_label(row.strategy, row.params) for row in frame.itertuples()]
        errors = [frame["speedup"] - frame["speedup_low"], frame["speedup_high"] - frame["speedup"]]
        ax.barh(range(len(frame)), frame["speedup"], xerr=errors, capsize=2,
                color=[colours[name] for name in frame["strategy"]])
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(frame)), labels, fontsize=7)
        ax.set_title(" / ".join(key) if isinstance(key, tuple) else str(key), fontsize=9)
        ax.set_xlabel("speedup over autoregressive (95% CI)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[name]) for name in strategies]
    columns = max(1, min(len(strategies), 4 * len(facets)))
    legend_rows = -(-len(strategies) // columns)
    fig.legend(handles, strategies, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, min(0.4, 0.05 * legend_rows + 0.02), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def short_label(strategy: str, params: str, width: int = 48) -> str:
    text = f"{strategy} {params}" if params != "-" else strategy
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_acceptance_vs_gamma(groups: pd.DataFrame, path: Path) -> bool:
    """α and τ against draft length γ, one line per (strategy, other params, prompt set); False when no strategy
    swept γ over at least two values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for row in groups.itertuples():
        raw = row.params_raw
        if isinstance(raw, dict) and isinstance(raw.get("gamma"), int):
            rest = ", ".join(f"{k}={v}" for k, v in raw.items() if k != "gamma")
            rows.append({"line": f"{row.target} {row.strategy} {rest} | {row.prompt_set}", "gamma": raw["gamma"],
                         "alpha": row.alpha, "tau": row.tau})
    table = pd.DataFrame(rows)
    if table.empty or table.groupby("line")["gamma"].nunique().max() < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for line, frame in table.groupby("line"):
        if frame["gamma"].nunique() < 2:
            continue
        frame = frame.sort_values("gamma")
        axes[0].plot(frame["gamma"], frame["alpha"], marker="o", label=short_label(line, "-", 60))
        axes[1].plot(frame["gamma"], frame["tau"], marker="o")
    axes[0].set_ylabel("α (accepted / drafted)")
    axes[1].set_ylabel("τ (tokens per target step)")
    for ax in axes:
        ax.set_xlabel("γ (draft tokens per step)")
    fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
