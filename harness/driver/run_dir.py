"""A run directory's integrity: one driver at a time (a lock naming its holder), a plan of the cells each run
meant to record (so a resume with another sweep is refused), and ``fsck``, which lists what is wrong in it."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.core.errors import ConfigError, InfraError
from harness.core.paths import content_hash, writable_directory
from harness.core.results import ResultStore

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LOCK_FILE = ".lock"
PLAN_FILE = "plan.json"
SWEEP_SNAPSHOT = "sweep.yaml"


def prepare(run_dir: Path) -> bool:
    """Create ``run_dir`` (parents included) and check that it is writable; return whether it was created.
    ``InfraError`` naming the path when it cannot be."""
    existed = run_dir.is_dir()
    writable_directory(run_dir, "results directory", "choose a writable --results-dir, or another --run-name")
    return not existed


def named_run_dir(results_dir: str | Path, sweep_name: str, run_name: str | None) -> Path:
    """``results_dir/<sweep>/<run name>`` (a timestamp when ``run_name`` is None); ``ConfigError`` on a run name that
    is not one plain directory name, so a run directory never lands outside its sweep's results."""
    if run_name is None:
        return Path(results_dir) / sweep_name / time.strftime("%Y%m%d-%H%M%S")
    if not RUN_NAME.fullmatch(run_name) or run_name in (".", ".."):
        raise ConfigError("--run-name", f"{run_name!r} is not a plain directory name",
                          "use letters, digits, '.', '_' and '-' (no '/'); to place runs elsewhere use --results-dir")
    return Path(results_dir) / sweep_name / run_name


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` for as long as the driver runs, with its pid and host written in
    the file. The kernel drops the lock when its process dies, so a dead driver's lock is simply taken over."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = lambda message: None) -> None:
        self.path = run_dir / LOCK_FILE
        self.log = log
        self.handle: Any = None

    def __enter__(self) -> "RunLock":
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise InfraError(f"run directory {self.path.parent} is in use by another specsweep driver ({holder})",
                             "wait for it to finish, or choose another --run-name") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            self.log(f"taking over the lock of {self.path.parent}, left by a driver that is gone ({_holder(previous)})")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": platform.node(), "since": time.time()}))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def plan_key(identity: dict[str, Any]) -> str:
    """A cell's key in ``plan.json``: its identity without the device type and baseline cell (which Ray decides
    when the run starts), so a plan written before Ray starts matches the records of any device."""
    return content_hash({key: value for key, value in identity.items() if key not in ("device", "baseline_id")})[:16]


def check_plan(run_dir: Path, cell_ids: list[str], recorded: set[str], force: bool) -> bool:
    """Compare this run's cells with those the run directory was planned for (``plan.json``; for a directory of an
    older specsweep, with the cells it ``recorded``): ``ConfigError`` when they differ, unless ``force``. Returns
    whether the earlier ``sweep.yaml`` should be kept aside (a forced resume with another sweep)."""
    plan_path = run_dir / PLAN_FILE
    new = set(cell_ids)
    if plan_path.exists():
        try:
            plan = json.loads(plan_path.read_text())
            planned = set(plan["cells"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError("--resume", f"{plan_path} is unreadable", "restore it, or resume with --force") from None
    else:
        plan, planned = {}, set(recorded)
        if planned <= new:
            return False
    if new == planned:
        return False
    added, dropped = len(new - planned), len(planned - new)
    if not force:
        earlier = repr(plan["sweep"]) if plan.get("sweep") else "an earlier sweep"
        raise ConfigError("--resume", f"{run_dir} was run with a different sweep ({earlier}: {added} of this "
                          f"sweep's cells are not in it, {dropped} of its cells are not in this sweep)",
                          "use a new --run-name, or --force to add this sweep's cells to it (both sweep files kept)")
    return (run_dir / SWEEP_SNAPSHOT).exists()


def keep_snapshot(run_dir: Path) -> Path:
    """Move the recorded ``sweep.yaml`` aside as ``sweep.<n>.yaml`` (a forced resume keeps both sweeps)."""
    index = 1
    while (run_dir / f"sweep.{index}.yaml").exists():
        index += 1
    target = run_dir / f"sweep.{index}.yaml"
    (run_dir / SWEEP_SNAPSHOT).rename(target)
    return target


def write_plan(run_dir: Path, sweep_name: str, cells: dict[str, str]) -> None:
    """Record the cells this run directory is for, plan key -> label (joined with an earlier plan after a forced
    resume)."""
    plan_path = run_dir / PLAN_FILE
    planned = dict(cells)
    if plan_path.exists():
        try:
            planned = {**json.loads(plan_path.read_text())["cells"], **planned}
        except (ValueError, KeyError, TypeError):
            pass
    plan_path.write_text(json.dumps({"sweep": sweep_name, "cells": dict(sorted(planned.items()))}, indent=1) + "\n")


@dataclass
class FsckReport:
    """What ``fsck`` found in a run directory."""

    records: int = 0
    unreadable: list[str] = field(default_factory=list)
    repeated: dict[str, int] = field(default_factory=dict)  # cell id -> records of it (more than one)
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # planned cells with no record
    lock: str = ""

    @property
    def clean(self) -> bool:
        return not (self.unreadable or self.missing or self.failed)

    def lines(self) -> list[str]:
        """The report, one finding per line."""
        lines = [f"{self.records} records"]
        lines += [f"unreadable: {line}" for line in self.unreadable]
        lines += [f"recorded {count} times (the last one counts): {cell}" for cell, count in self.repeated.items()]
        lines += [f"failed: {cell}" for cell in self.failed]
        lines += [f"not recorded: {cell}" for cell in self.missing]
        if self.lock:
            lines.append(f"lock: {self.lock}")
        if self.clean:
            lines.append("ok: every line reads, and every planned cell has a successful record")
        return lines


def fsck(run_dir: Path) -> FsckReport:
    """Check ``run_dir``: unreadable lines of ``cells.jsonl``, cells recorded more than once (a retry), failed
    cells, planned cells without a record, and whether a driver holds it now."""
    if not (run_dir / "cells.jsonl").exists() and not (run_dir / PLAN_FILE).exists():
        raise ConfigError("RUN_DIR", f"{run_dir} has no cells.jsonl or plan.json", "pass a results/<sweep>/<run> "
                          "directory")
    store = ResultStore(run_dir)
    records = list(store.records())
    report = FsckReport(records=len(records))
    report.unreadable = [f"line {line.number}: {line.reason}" for line in store.unreadable]
    counts = Counter(record.cell_id for record in records)
    report.repeated = {cell: count for cell, count in counts.items() if count > 1}
    latest = {record.cell_id: record for record in records}
    report.failed = [f"{cell} {record.label}: {record.error}" for cell, record in latest.items() if not record.ok]
    plan_path = run_dir / PLAN_FILE
    if plan_path.exists():
        try:
            planned = dict(json.loads(plan_path.read_text())["cells"])
        except (ValueError, KeyError, TypeError):
            report.unreadable.append(f"{PLAN_FILE}: not a plan")
        else:
            keys = {plan_key(record.cell) for record in latest.values()}
            report.missing = [f"{key} {label}" for key, label in planned.items() if key not in keys]
    lock_path = run_dir / LOCK_FILE
    if lock_path.exists():
        with open(lock_path) as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            except OSError:
                report.lock = f"held by a running driver ({_holder(handle.read())})"
    return report
