"""Where specsweep keeps its caches, and the content hashes that name them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def specsweep_home() -> Path:
    """Root of specsweep's caches: ``$SPECSWEEP_HOME``, else ``~/.cache/specsweep``."""
    return Path(os.environ.get("SPECSWEEP_HOME") or Path.home() / ".cache" / "specsweep").expanduser()


def content_hash(value: Any) -> str:
    """SHA-256 hex digest of ``value`` serialised as canonical JSON (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
