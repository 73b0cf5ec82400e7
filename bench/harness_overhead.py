"""Harness overhead benchmark: scheduling + result-writing cost per cell, and throughput of 2 CPU workers vs 1.

For each worker count the same sweep runs into a fresh run directory. Per cell,
the driver measures the time from submitting the cell to receiving its record
(``driver_s``) and the time to append the record (``store_s``); the worker
reports its own time running the cell (``worker_s``). Overhead per cell is
``driver_s - worker_s + store_s``; the fraction is its sum over the sum of
``driver_s + store_s``. Throughput is cells per second from the first
submission to the last stored result (Ray and worker start-up excluded: they
are paid once per sweep; model loading is included).

    python bench/harness_overhead.py configs/quickstart.yaml --workers 1 2              # 2 CPUs shared
    python bench/harness_overhead.py configs/quickstart.yaml --workers 1 2 --cpus-per-worker 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path


def measure(sweep_path: str, workers: int, cpus: int) -> dict[str, float]:
    """Run the sweep once with ``workers`` CPU workers sharing ``cpus`` CPUs; return timing figures."""
    import ray

    from harness.core.local_ray import start_local_ray
    from harness.driver.config import load_sweep
    from harness.driver.scheduler import run_sweep

    sweep = load_sweep(sweep_path)
    sweep = dataclasses.replace(sweep, run=dataclasses.replace(sweep.run, workers=workers, num_cpus=cpus))
    start_local_ray(cpus, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            started = time.perf_counter()
            outcome = run_sweep(sweep, Path(run_dir), log=lambda message: None)
            wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    driver = sum(t["driver_s"] for t in outcome.timings)
    worker = sum(t["worker_s"] for t in outcome.timings)
    store = sum(t["store_s"] for t in outcome.timings)
    cells = len(outcome.timings)
    span = max(t["stored"] for t in outcome.timings) - min(t["submitted"] for t in outcome.timings)
    return {
        "workers": workers,
        "cells": cells,
        "failed": outcome.failed,
        "wall_s": wall,
        "cpus": cpus,
        "dispatch_span_s": span,
        "cells_per_s": cells / span,
        "overhead_s_per_cell": (driver - worker + store) / cells,
        "store_ms_per_cell": 1e3 * store / cells,
        "overhead_fraction": (driver - worker + store) / (driver + store),
        "mean_cell_s": worker / cells,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs shared by the workers")
    parser.add_argument("--cpus-per-worker", type=int, help="give each worker this many CPUs instead")
    args = parser.parse_args()
    results = [measure(args.sweep, workers, workers * args.cpus_per_worker if args.cpus_per_worker else args.cpus)
               for workers in args.workers]
    for result in results:
        print(json.dumps({key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}))
    if len(results) >= 2:
        print(f"throughput {results[-1]['workers']} vs {results[0]['workers']} workers: "
              f"{results[-1]['cells_per_s'] / results[0]['cells_per_s']:.2f}x")


if __name__ == "__main__":
    main()
