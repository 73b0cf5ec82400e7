"""The driver's live progress: a tqdm bar on a terminal (cells done / failed / total, per-worker activity, ETA),
one line per finished cell otherwise."""

from __future__ import annotations

import sys
from typing import Any, Callable

from harness.core.records import CellRecord


class Progress:
    """Tracks finished cells and shows them as a bar (terminal) or as log lines (files, CI)."""

    def __init__(self, total: int, done: int, failed: int, log: Callable[[str], None], stream: Any = None) -> None:
        self.total, self.done, self.failed = total, done + failed, failed
        self.log = log
        self.bar = None
        self.started = False  # the ETA counts from the first cell a worker takes, not from worker start-up
        self.stream = stream or sys.stderr  # the terminal, also while the sweep's other output goes to a log file
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=self.done, unit="cell", dynamic_ncols=True, file=self.stream)

    def cell_done(self, record: CellRecord) -> None:
        """Count one finished (or failed) cell and report it."""
        self.done += 1
        ok = record.ok
        self.failed += 0 if ok else 1
        status = "ok" if ok else f"FAILED: {(record.error or '')[:200]}"
        line = f"[{self.done}/{self.total}] {record.label or record.cell_id} on {record.worker}: {status}"
        if self.bar is not None:
            if not ok:
                self.bar.write(line, file=self.stream)
            self.bar.update(1)
            self.bar.set_description(self.counts())
            if self.done >= self.total:
                self.bar.set_postfix_str("", refresh=True)  # nothing is running any more
        else:
            self.log(f"{line} ({self.counts()})")

    def counts(self) -> str:
        return f"ok {self.done - self.failed}, failed {self.failed}"

    def refresh(self, busy: dict[str, Any]) -> None:
        """Show what each worker is running now."""
        if self.bar is not None:
            if busy and not self.started:
                self.started = True
                self.bar.start_t = self.bar.last_print_t = self.bar._time()  # tqdm's clock: ETA from here
            activity = " | ".join(f"{name}: {cell.label}" for name, cell in sorted(busy.items()))
            self.bar.set_postfix_str(activity[:160] if self.done < self.total else "", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
