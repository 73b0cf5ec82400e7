"""Per cell, a quiet run against a loaded run of the same sweep, with the drift guard's flags (recomputed from the
records with the guard as it stands), and the two checks of the calibrated guard: few flags when quiet, and every
cell the load moved by more than 15 % flagged.

    python bench/drift_table.py QUIET_RUN_DIR LOADED_RUN_DIR [--out drift.md] [--moved 0.15]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from harness.core.metrics import MAX_CPU_WAIT, summarize
from harness.core.results import ResultStore


def cell_summaries(run_dir: Path) -> dict[str, tuple[str, dict]]:
    """cell id -> (label, summary with the guard's verdict) of each ok strategy cell of ``run_dir``."""
    summaries = {}
    for cell_id, record in ResultStore(run_dir).latest().items():
        if record.ok and record.kind == "strategy":
            summaries[cell_id] = (record.label, summarize(
                record.prompts, sampled=record.sampled, drift_tolerance=float(record.timing.get("tolerance", 0.10)),
                max_cpu_wait=float(record.timing.get("max_cpu_wait", MAX_CPU_WAIT))))
    return summaries


def percent(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.0%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quiet", type=Path)
    parser.add_argument("loaded", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--moved", type=float, default=0.15, help="a move in speedup that must be flagged")
    args = parser.parse_args()
    quiet, loaded = cell_summaries(args.quiet), cell_summaries(args.loaded)
    lines = ["| cell | quiet speedup | loaded speedup | change | flagged quiet | flagged loaded | loaded CPU wait "
             "(strategy / baseline) | loaded probe drift (band) | why flagged (loaded) |",
             "|---|---|---|---|---|---|---|---|---|"]
    quiet_flags = moved = moved_flagged = 0
    for cell_id, (label, calm) in quiet.items():
        if cell_id not in loaded:
            continue
        busy = loaded[cell_id][1]
        change = busy["speedup"] / calm["speedup"] - 1
        quiet_flags += calm["timing_suspect"]
        if abs(change) > args.moved:
            moved += 1
            moved_flagged += busy["timing_suspect"]
        note = busy["timing_note"].split(":")[0] if busy["timing_suspect"] else ""
        lines.append(f"| {label} | {calm['speedup']:.2f} | {busy['speedup']:.2f} | {change:+.0%} | "
                     f"{'yes' if calm['timing_suspect'] else 'no'} | {'yes' if busy['timing_suspect'] else 'no'} | "
                     f"{busy['strategy_cpu_wait']:.0%} / {busy['baseline_cpu_wait']:.0%} | "
                     f"{percent(busy['step_drift'])} ({busy['drift_band']:.0%}) | {note} |")
    count = sum(cell_id in loaded for cell_id in quiet)
    mean = lambda runs: sum(runs[c][1]["speedup"] for c in quiet if c in loaded) / max(1, count)  # noqa: E731
    lines += ["", f"- cells: {count}; mean speedup quiet {mean(quiet):.3f}, loaded {mean(loaded):.3f}",
              f"- flagged when quiet: {quiet_flags} of {count}",
              f"- moved by more than {args.moved:.0%} under the load: {moved}, of which flagged: {moved_flagged}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if quiet_flags <= 1 and moved_flagged == moved else 1


if __name__ == "__main__":
    raise SystemExit(main())
