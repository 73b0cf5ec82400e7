"""Test plugin: importing it inside a Ray worker kills the worker while it starts, as a broken node would.

``$SPECSWEEP_TEST_CRASHES`` names a file holding how many worker starts may still crash (absent or 0: none).
The driver imports the plugin too (to validate the sweep); it never crashes there.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray


def _in_a_worker() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


_budget = Path(os.environ.get("SPECSWEEP_TEST_CRASHES", "/nonexistent"))
if _in_a_worker() and _budget.is_file():
    left = int(_budget.read_text() or 0)
    if left > 0:
        _budget.write_text(str(left - 1))
        os._exit(1)
