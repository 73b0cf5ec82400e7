"""Do two runs decode the same? For refactors that must keep behaviour: compare two run directories' cells.jsonl.

Cells are matched by strategy, resolved params, prompt set and shard (so runs whose cell ids differ still pair);
turns by prompt id and turn index (so a ``--limit`` run compares on the prompts it has). For every shared turn it
compares the strategy side's tokens, step count, drafted and accepted counts, and the baseline's tokens; it prints
each cell that differs and exits 1 if any does.

    python bench/same_decoding.py results/quickstart/before results/quickstart/after
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.core.results import ResultStore
from strategies import parse_params


def decoding(run_dir: Path) -> dict[tuple, dict[tuple, tuple]]:
    """Per strategy cell, per (prompt id, turn): what was decoded."""
    cells: dict[tuple, dict[tuple, tuple]] = {}
    for record in ResultStore(run_dir).latest().values():
        if not record.ok or record.kind != "strategy":
            continue
        params = json.dumps(parse_params(record.strategy, record.params, "params").as_dict(), sort_keys=True)
        key = (record.strategy, params, record.prompt_set, record.cell["shard"])
        cells[key] = {(prompt.prompt_id, index): (tuple(turn.strategy.tokens), turn.strategy.steps,
                                                  turn.strategy.drafted, turn.strategy.accepted,
                                                  tuple(turn.baseline.tokens))
                      for prompt in record.prompts for index, turn in enumerate(prompt.turns)}
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = decoding(args.before), decoding(args.after)
    turns = differ = 0
    for key in sorted(set(before) & set(after), key=str):
        shared = set(before[key]) & set(after[key])
        turns += len(shared)
        changed = [turn for turn in shared if before[key][turn] != after[key][turn]]
        if changed:
            differ += 1
            old, new = before[key][changed[0]], after[key][changed[0]]
            print(f"differs: {key[0]} {key[1]} {key[2]}: tokens {'same' if old[0] == new[0] else 'differ'}, "
                  f"steps {old[1]} -> {new[1]}, drafted {old[2]} -> {new[2]}, accepted {old[3]} -> {new[3]}")
    both = len(set(before) & set(after))
    print(f"{both} cells and {turns} turns compared: {both - differ} identical, {differ} different; "
          f"{len(set(before) - set(after))} cells only in the first run, {len(set(after) - set(before))} only in the second")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
