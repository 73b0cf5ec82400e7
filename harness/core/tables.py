"""Markdown tables and the view of a run that report sections read: shared by the report and by methods that
add their own section to it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from harness.core.records import CellRecord


@dataclass(frozen=True)
class ReportView:
    """What a report section may read: one row per (target, strategy, params, prompt set) with its pooled metrics
    and method stats (``groups``), the cell records by id, where figures go, whether the run has several targets,
    and how a cell's params are labelled in ``groups``."""

    groups: pd.DataFrame
    records: dict[str, CellRecord]
    run_dir: Path
    multi_target: bool
    config_label: Callable[[CellRecord], str]  # a cell's params label, as its group row shows it

    def target_column(self) -> dict[str, str]:
        """``{"target": "target"}`` when the run has several targets, else nothing (a table's leading column)."""
        return {"target": "target"} if self.multi_target else {}


def params_label(params: dict[str, Any]) -> str:
    """Params as ``key=value`` pairs in JSON, ``-`` for none."""
    return ", ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in params.items()) or "-"


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell's text: ``-`` for missing, yes/no for booleans, ``digits`` decimals for floats."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def escape_cell(text: str) -> str:
    """``text`` safe inside a markdown table cell: pipes escaped, line breaks folded."""
    return " ".join(str(text).replace("|", "\\|").split())


def markdown_table(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    """A GitHub markdown table of ``frame``'s ``columns`` (name -> header)."""
    lines = ["| " + " | ".join(escape_cell(header) for header in columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(escape_cell(fmt(row.get(name))) for name in columns) + " |")
    return "\n".join(lines)
