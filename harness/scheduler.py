"""The driver: start Ray and the workers, hand cells to idle workers, store each result as it arrives.

Dispatch is pull-based over ``ray.wait`` (pending result -> (worker, cell)):
an idle worker gets the next cell, preferring one whose target it already
holds; a worker that dies is replaced and its cell re-queued up to
``run.max_retries`` times, after which the cell is recorded as failed.
Cells already in the run directory are skipped (resume).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.config import Cell, Sweep
from harness.results import ResultStore
from harness.worker import Worker


@dataclass
class SweepOutcome:
    """What a sweep run did: counts and where its results are."""

    run_dir: Path
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)


def git_commit() -> str:
    """The current git commit of the working directory (``unknown`` outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def init_ray(sweep: Sweep, address: str | None) -> None:
    """Join the Ray cluster at ``address`` or start a local one sized from ``run.num_cpus``."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"SPECSWEEP_HOME": str(_home()), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
                        "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        cpus = sweep.run.num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=cpus, runtime_env=env, include_dashboard=False, log_to_driver=True)


def _home() -> Path:
    from harness.paths import specsweep_home

    return specsweep_home()


def worker_plan(sweep: Sweep) -> tuple[int, dict[str, Any], str]:
    """How many workers to start, their Ray resource options, and the device they use."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and sweep.device in ("auto", "cuda"):
        return gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda"
    cpus = int(resources.get("CPU", 1))
    count = min(sweep.run.workers, max(1, cpus))
    return count, {"num_cpus": max(1, cpus // count), "num_gpus": 0}, "cpu"


class Dispatcher:
    """Keeps every worker busy with one cell at a time and writes results as they come back."""

    def __init__(self, sweep: Sweep, store: ResultStore, on_event: Callable[[str], None]) -> None:
        import ray

        self.ray = ray
        self.sweep = sweep
        self.store = store
        self.log = on_event
        self.count, self.options, self.device = worker_plan(sweep)
        self.remote_cls = ray.remote(Worker)
        self.workers: dict[str, Any] = {}
        self.held_targets: dict[str, set[str]] = {}
        self.commit = git_commit()
        self._serial = 0
        for _ in range(self.count):
            self._start_worker()

    def _start_worker(self) -> str:
        self._serial += 1
        name = f"worker-{self._serial}"
        threads = self.options["num_cpus"] if self.device == "cpu" else None
        self.workers[name] = self.remote_cls.options(**self.options, name=None).remote(
            self.sweep.zoo, self.device, name, threads)
        self.held_targets[name] = set()
        return name

    def _next_cell(self, queue: deque[Cell], worker: str) -> Cell:
        held = self.held_targets[worker]
        for index, cell in enumerate(queue):
            if cell.target_spec.id in held:
                del queue[index]
                return cell
        return queue.popleft()

    def run(self, cells: list[Cell], outcome: SweepOutcome) -> None:
        """Run ``cells`` to completion (or recorded failure)."""
        queue: deque[Cell] = deque(cells)
        attempts: dict[str, int] = {}
        pending: dict[Any, tuple[str, Cell]] = {}
        started = time.perf_counter()

        def submit(worker: str) -> None:
            if not queue:
                return
            cell = self._next_cell(queue, worker)
            attempts[cell.cell_id] = attempts.get(cell.cell_id, 0) + 1
            pending[self.workers[worker].run.remote(cell)] = (worker, cell)

        for worker in list(self.workers):
            submit(worker)
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            worker, cell = pending.pop(ref)
            try:
                record = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError,
                    self.ray.exceptions.ObjectLostError) as error:
                self.log(f"{worker} died while running {cell.cell_id} ({type(error).__name__}); starting a replacement")
                self._retire(worker)
                worker = self._start_worker()
                if attempts[cell.cell_id] <= self.sweep.run.max_retries:
                    queue.appendleft(cell)
                else:
                    record = self._lost_record(cell, worker, error, attempts[cell.cell_id])
                    self._store(record, outcome, started)
                submit(worker)
                continue
            self.held_targets[worker].add(cell.target_spec.id)
            self._store(record, outcome, started)
            submit(worker)

    def _retire(self, worker: str) -> None:
        handle = self.workers.pop(worker)
        self.held_targets.pop(worker, None)
        try:
            self.ray.kill(handle)
        except Exception:  # already dead
            pass

    def _lost_record(self, cell: Cell, worker: str, error: Exception, attempts: int) -> dict[str, Any]:
        return {"cell_id": cell.cell_id, "label": cell.label, "cell": cell.identity(), "worker": worker,
                "status": "failed", "error": f"worker lost {attempts} times: {type(error).__name__}: {error}"}

    def _store(self, record: dict[str, Any], outcome: SweepOutcome, started: float) -> None:
        record["commit"] = self.commit
        self.store.append(record)
        if record["status"] == "ok":
            outcome.ok += 1
        else:
            outcome.failed += 1
            outcome.failed_ids.append(record["cell_id"])
        done = outcome.ok + outcome.failed
        remaining = outcome.total - outcome.skipped - done
        elapsed = time.perf_counter() - started
        eta = elapsed / done * remaining if done else 0.0
        status = "ok" if record["status"] == "ok" else f"FAILED: {record.get('error', '')[:200]}"
        self.log(f"[{done + outcome.skipped}/{outcome.total}] {record.get('label', record['cell_id'])} "
                 f"on {record.get('worker')}: {status} (failed {outcome.failed}, eta {eta:.0f} s)")

    def shutdown(self) -> None:
        for worker in list(self.workers):
            self._retire(worker)


def run_sweep(sweep: Sweep, run_dir: Path, address: str | None = None, log: Callable[[str], None] | None = None,
              retry_failed: bool = False) -> SweepOutcome:
    """Run every cell of ``sweep`` not yet recorded in ``run_dir``; return the outcome."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    store = ResultStore(run_dir)
    latest = store.latest()
    done = {cid for cid, rec in latest.items() if rec.get("status") == "ok" or not retry_failed}
    cells = sweep.cells()
    todo = [cell for cell in cells if cell.cell_id not in done]
    outcome = SweepOutcome(run_dir=run_dir, total=len(cells), skipped=len(cells) - len(todo))
    outcome.failed_ids = [cid for cid in done if latest[cid].get("status") != "ok" and cid in {c.cell_id for c in cells}]
    outcome.failed = len(outcome.failed_ids)
    outcome.ok = outcome.skipped - outcome.failed
    if outcome.skipped:
        log(f"resuming {run_dir}: {outcome.skipped} of {len(cells)} cells already recorded")
    if not todo:
        return outcome
    if sweep.uses_zoo():
        from training.zoo import build_zoo, format_manifest, is_built

        if not is_built(sweep.zoo):
            log("building the embedded zoo (once; cached under $SPECSWEEP_HOME)")
            log(format_manifest(build_zoo(sweep.zoo, log=log)))
    init_ray(sweep, address)
    dispatcher = Dispatcher(sweep, store, log)
    log(f"running {len(todo)} cells on {dispatcher.count} {dispatcher.device} worker(s); results -> {store.path}")
    try:
        dispatcher.run(todo, outcome)
    finally:
        dispatcher.shutdown()
    return outcome
