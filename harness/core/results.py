"""The append-only result store of a run: one JSON line per finished cell in ``cells.jsonl``.

Records are strict JSON (a NaN or infinite float is written as ``null``). Each is
written with a single ``write`` of one complete line followed by ``fsync``, so a
crash can at worst leave a torn last line. Readers skip a line
that does not parse as a record and count it in ``unreadable``, so callers can
say how many there were.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.core.records import CellRecord, RecordError

CELLS_FILE = "cells.jsonl"


@dataclass
class UnreadableLine:
    """A line of ``cells.jsonl`` that is not a readable record: its 1-based number and why."""

    number: int
    reason: str


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (nested in lists and mappings) as ``None``: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


class ResultStore:
    """Reads and appends the cell records of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CELLS_FILE
        self.unreadable: list[UnreadableLine] = []  # filled by the last ``records`` pass

    def append(self, record: CellRecord) -> None:
        """Append ``record`` as one line, durably."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(finite(record.to_json()), default=str, separators=(",", ":"), allow_nan=False) + "\n"
        with open(self.path, "ab") as handle:
            if handle.tell() and not self._ends_with_newline():
                handle.write(b"\n")  # seal a torn last line left by a crash
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def records(self) -> Iterator[CellRecord]:
        """Every readable record, in write order; the lines that are not are listed in ``unreadable``."""
        self.unreadable = []
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    yield CellRecord.from_json(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    self.unreadable.append(UnreadableLine(number, f"not JSON ({type(error).__name__})"))
                except RecordError as error:
                    self.unreadable.append(UnreadableLine(number, str(error)))

    def latest(self) -> dict[str, CellRecord]:
        """The last record of each cell id."""
        return {record.cell_id: record for record in self.records()}
