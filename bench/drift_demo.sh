#!/usr/bin/env bash
# The quickstart three ways: on a quiet machine, and under CPU busy loops (one per core) started mid-run, with interleaved and
# with shared pairing; then a leaderboard of the three. Compare the speedups; the shared run's distorted cells
# should be flagged timing_suspect (report.md and summary.csv).
#   bash bench/drift_demo.sh [RESULTS_DIR] [LOAD_AFTER_SECONDS] [EXTRA RUN ARGS, e.g. --limit 3]
set -euo pipefail
results=${1:-results}
after=${2:-45}
shift $(( $# < 2 ? $# : 2 ))
extra=("$@")
specsweep=${SPECSWEEP:-specsweep}

busy_loops_after() {  # one busy process per core, started $1 s from now, for the rest of the run
    for _ in $(seq "$(nproc)"); do
        # at the niceness Ray gives its workers (15): an equal competitor, not one that starves the worker
        (sleep "$1"; exec nice -n 15 python3 -c "while True: pass") > /dev/null 2>&1 &
    done
}

[ -d "$results/quickstart/quiet" ] || $specsweep run configs/quickstart.yaml --results-dir "$results" --run-name quiet -q \
    "${extra[@]}"
for pairing in interleaved shared; do
    busy_loops_after "$after"
    $specsweep run configs/quickstart.yaml --results-dir "$results" --run-name "load-$pairing" -q \
        --set run.pairing=$pairing "${extra[@]}" || true
    pkill -f "while True: pass" 2>/dev/null || true
done
$specsweep compare "$results"/quickstart/quiet "$results"/quickstart/load-interleaved \
    "$results"/quickstart/load-shared --out "$results"/compare/quickstart-drift
