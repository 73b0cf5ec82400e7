"""Where specsweep keeps its caches, and the content hashes that name them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from harness.core.errors import InfraError

HOME_FIX = "point SPECSWEEP_HOME at a writable directory (unset, it is ~/.cache/specsweep)"


def specsweep_home() -> Path:
    """Root of specsweep's caches: ``$SPECSWEEP_HOME``, else ``~/.cache/specsweep``."""
    return Path(os.environ.get("SPECSWEEP_HOME") or Path.home() / ".cache" / "specsweep").expanduser()


def checked_home() -> Path:
    """``specsweep_home()``, created if missing and proven writable, before any work is done in it."""
    home = specsweep_home()
    writable_directory(home, "$SPECSWEEP_HOME", HOME_FIX)
    return home


def writable_directory(path: Path, what: str, fix: str) -> None:
    """Create ``path`` (parents included) and write a probe file in it; ``InfraError`` naming ``what``, the path
    and ``fix`` when a part of it is a file or it cannot be written."""
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise InfraError(f"{what} {path}: {parent} is a file, not a directory", fix)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = "read-only filesystem" if error.errno == errno.EROFS else error.strerror or type(error).__name__
        raise InfraError(f"{what} {path} is not writable ({reason})", fix) from None


def content_hash(value: Any) -> str:
    """SHA-256 hex digest of ``value`` serialised as canonical JSON (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
