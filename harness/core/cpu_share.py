"""How much CPU this process's threads got while they wanted it, from Linux's per-thread scheduler statistics
(``/proc/self/task/<tid>/schedstat``: time on a CPU, time runnable but waiting in a run queue).

Run-queue wait is the drift guard's direct contention signal: a thread waits only when something else holds the
CPU it could run on. It does not depend on how a method spends its time (many small calls or few large ones),
so it tells contention from a method's own overheads.
"""

from __future__ import annotations

from pathlib import Path

TASKS = Path("/proc/self/task")

Snapshot = dict[str, tuple[int, int]]  # thread id -> (ns on a CPU, ns waiting to run)


def snapshot() -> Snapshot | None:
    """Each live thread's cumulative run and wait nanoseconds, or None where the kernel does not report them."""
    times: Snapshot = {}
    try:
        tasks = list(TASKS.iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            run, wait = (int(field) for field in (task / "schedstat").read_text().split()[:2])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        times[task.name] = (run, wait)
    return times or None


def run_and_wait_s(before: Snapshot | None, after: Snapshot | None) -> tuple[float, float] | None:
    """Seconds the threads ran and waited to run between two snapshots (threads started meanwhile count from
    zero), or None when either snapshot is missing."""
    if before is None or after is None:
        return None
    run = wait = 0
    for thread, (run_after, wait_after) in after.items():
        run_before, wait_before = before.get(thread, (0, 0))
        run += max(0, run_after - run_before)
        wait += max(0, wait_after - wait_before)
    return run / 1e9, wait / 1e9
