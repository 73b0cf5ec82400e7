#!/usr/bin/env bash
# The quickstart three ways: on a quiet machine, and under a CPU busy loop started mid-run with interleaved and
# with shared pairing; then a leaderboard of the three. Compare the speedups; the shared run's distorted cells
# should be flagged timing_suspect (report.md and summary.csv).
#   bash bench/drift_demo.sh [RESULTS_DIR] [LOAD_AFTER_SECONDS]
set -euo pipefail
results=${1:-results}
after=${2:-45}
specsweep=${SPECSWEEP:-specsweep}

busy_loop_after() {  # one busy process, started $1 s from now, for the rest of the run
    (sleep "$1"; exec python3 -c "while True: pass") &
    echo $!
}

$specsweep run configs/quickstart.yaml --results-dir "$results" --run-name quiet -q
for pairing in interleaved shared; do
    loader=$(busy_loop_after "$after")
    $specsweep run configs/quickstart.yaml --results-dir "$results" --run-name "load-$pairing" -q \
        --set run.pairing=$pairing || true
    kill "$loader" 2>/dev/null || true
    pkill -f "while True: pass" 2>/dev/null || true
done
$specsweep compare "$results"/quickstart/quiet "$results"/quickstart/load-interleaved \
    "$results"/quickstart/load-shared --out "$results"/compare/quickstart-drift
