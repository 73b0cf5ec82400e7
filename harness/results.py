"""The append-only result store of a run: one JSON line per finished cell in ``cells.jsonl``.

Each record is written with a single ``write`` of one complete line followed by
``fsync``, so a crash can at worst leave a torn last line, which readers skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

CELLS_FILE = "cells.jsonl"


class ResultStore:
    """Reads and appends the cell records of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CELLS_FILE

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line, durably."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
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

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record, in write order (torn or corrupt lines skipped)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            for raw in handle:
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict) and "cell_id" in record:
                    yield record

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each cell id."""
        return {record["cell_id"]: record for record in self.records()}

