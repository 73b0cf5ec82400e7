"""Published speculative-decoding rankings shipped as data (``data/published/rankings.csv``, sources in
``data/published/SOURCES.md``): each table's methods with their published speedup, τ and rank, and the specsweep
strategy that implements each (empty where specsweep has none)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

RANKINGS_FILE = Path(__file__).parent / "data" / "published" / "rankings.csv"


@dataclass(frozen=True)
class PublishedEntry:
    """One method's row in one published table."""

    table: str
    method: str
    strategy: str
    speedup: float
    tau: float
    rank: int


def published_rankings(path: Path = RANKINGS_FILE) -> list[PublishedEntry]:
    """Every published row, in the file's order (each table by its published rank)."""
    with path.open(newline="") as handle:
        return [PublishedEntry(table=row["table"], method=row["method"], strategy=row["strategy"],
                               speedup=float(row["speedup"]), tau=float(row["tau"]), rank=int(row["rank"]))
                for row in csv.DictReader(handle)]
