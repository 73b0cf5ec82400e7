#!/usr/bin/env bash
# The drift guard, calibrated: the quickstart on a quiet machine, then again with busy loops (one per core, at the
# default niceness 0, as a user's other jobs would be) started mid-run; then, per cell, quiet against loaded with
# the guard's flags (bench/drift_table.py; exit 1 if more than one quiet cell is flagged or a cell that moved by
# more than 15 % under the load is not).
#   bash bench/drift_demo.sh [RESULTS_DIR] [LOAD_AFTER_SECONDS] [EXTRA RUN ARGS, e.g. --limit 3]
set -euo pipefail
results=${1:-results}
after=${2:-20}
shift $(( $# < 2 ? $# : 2 ))
extra=("$@")
specsweep=${SPECSWEEP:-specsweep}
here=$(cd "$(dirname "$0")" && pwd)

busy_loops_after() {  # one busy process per core, started $1 s from now, until stop_loops
    for _ in $(seq "$(nproc)"); do
        (sleep "$1"; exec python3 -c "while True: pass") > /dev/null 2>&1 &
    done
}
stop_loops() { pkill -f "while True: pass" 2>/dev/null || true; }
trap stop_loops EXIT

$specsweep run configs/quickstart.yaml --results-dir "$results" --run-name quiet -q "${extra[@]}"
busy_loops_after "$after"
$specsweep run configs/quickstart.yaml --results-dir "$results" --run-name loaded -q "${extra[@]}" || true
stop_loops
python3 "$here/drift_table.py" "$results/quickstart/quiet" "$results/quickstart/loaded" \
    --out "$results/quickstart/drift.md"
