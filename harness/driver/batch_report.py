"""The report's batch-size section: speedup against batch size per method, the crossover batch size, per-request
latency, and a speedup-versus-batch-size plot (``run.batch_size`` and grids over ``batch_size``)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from harness.core.tables import markdown_table

BATCH_SUFFIX = re.compile(r" \(batch (\d+)\)$")  # what ``report.config_label`` appends above batch size 1


def with_batch_size(label: str, batch_size: int) -> str:
    """A params label naming its batch size when above 1 (``method_label`` and ``batch_size_of`` read it back)."""
    return f"{label} (batch {batch_size})" if batch_size != 1 else label


def method_label(params: str) -> str:
    """A group's params label without its batch size, naming the method across batch sizes."""
    return BATCH_SUFFIX.sub("", params)


def batch_size_of(params: str) -> int:
    """The batch size a group's params label names (1 when it names none)."""
    found = BATCH_SUFFIX.search(params)
    return int(found.group(1)) if found else 1


def crossover(frame: pd.DataFrame) -> str:
    """The smallest batch size from which the speedup's interval lies below 1 at every larger size measured, or
    ``none up to B`` (the largest size measured) when speculation still pays there."""
    frame = frame.sort_values("batch_size")
    below = list(frame["speedup_high"] < 1.0)
    for index in range(len(below)):
        if all(below[index:]):
            return str(int(frame["batch_size"].iloc[index]))
    return f"none up to {int(frame['batch_size'].max())}"


def batch_size_section(groups: pd.DataFrame, run_dir: Path, multi_target: bool) -> list[str]:
    """Markdown for the section (empty when every group ran at batch size 1), and ``speedup_vs_batch.png``."""
    if groups.empty or (groups["batch_size"] == 1).all():
        return []
    groups = groups.assign(method=groups["params"].map(method_label))
    keys = (["target"] if multi_target else []) + ["strategy", "method", "prompt_set"]
    sizes = sorted(groups["batch_size"].unique())
    rows = []
    for key, frame in groups.groupby(keys):
        row = dict(zip(keys, key))
        for size in sizes:
            at = frame[frame["batch_size"] == size]
            row[f"B={size}"] = (f"{at['speedup'].iloc[0]:.2f} [{at['speedup_low'].iloc[0]:.2f}, "
                                f"{at['speedup_high'].iloc[0]:.2f}]") if len(at) else "-"
        row["crossover"] = crossover(frame)
        rows.append(row)
    table = pd.DataFrame(rows)
    names = {**({"target": "target"} if multi_target else {}), "strategy": "strategy", "method": "params",
             "prompt_set": "prompt set", **{f"B={size}": f"B={size}" for size in sizes}, "crossover": "crossover B"}
    latency = groups[groups["batch_size"] > 1].sort_values([*keys, "batch_size"])
    latency_names = {**({"target": "target"} if multi_target else {}), "strategy": "strategy", "method": "params",
                     "prompt_set": "prompt set", "batch_size": "B"}
    for column, title in (("strategy_ttft_ms_p50", "TTFT p50 ms"), ("strategy_ttft_ms_p99", "TTFT p99 ms"),
                          ("strategy_tpot_ms_p50", "TPOT p50 ms"), ("strategy_tpot_ms_p99", "TPOT p99 ms"),
                          ("baseline_tpot_ms_p50", "baseline TPOT p50 ms"), ("tau", "τ"), ("alpha", "α")):
        if column in latency:
            latency_names[column] = title
    plot_speedup_vs_batch(groups, keys, run_dir / "speedup_vs_batch.png")
    return ["## Batch size", "",
            "Speedup is the ratio of batch throughputs against the autoregressive baseline at the same batch size "
            "(static batches: a finished row idles until its batch ends, on both sides). The crossover is the "
            "smallest batch size from which the 95% interval stays below 1.", "",
            markdown_table(table, names), "",
            "Per-request latency in the batched cells (time to first token from the batch's start, time per "
            "output token after it):", "",
            markdown_table(latency, latency_names), "",
            "![speedup against batch size](speedup_vs_batch.png)", ""]


def plot_speedup_vs_batch(groups: pd.DataFrame, keys: list[str], path: Path) -> None:
    """Speedup (95% interval band) against batch size, one panel per prompt set, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt_sets = sorted(groups["prompt_set"].unique())
    fig, axes = plt.subplots(1, len(prompt_sets), figsize=(5.5 * len(prompt_sets), 3.6), squeeze=False)
    for ax, prompt_set in zip(axes[0], prompt_sets):
        frame = groups[groups["prompt_set"] == prompt_set]
        for key, line in frame.groupby([k for k in keys if k != "prompt_set"]):
            line = line.sort_values("batch_size")
            label = " ".join(str(part) for part in (key if isinstance(key, tuple) else (key,)))
            ax.plot(line["batch_size"], line["speedup"], marker="o", label=label[:60])
            ax.fill_between(line["batch_size"], line["speedup_low"], line["speedup_high"], alpha=0.15)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput speedup (95% CI)")
        ax.set_title(str(prompt_set), fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
