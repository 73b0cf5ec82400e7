"""Checksums of cached files: what a build records in its manifest, and what a load verifies against it.

Each cache that holds weights (a zoo build, a trained artefact, a converted ``gguf:``/``pkg:`` model) records the
size and SHA-256 of every file it wrote under ``"files"`` in its manifest. Loading verifies the files it reads, so a
cut or altered file is one line naming it and the command that rebuilds it, not a loader's traceback. Hashes are
memoised per (path, size, mtime) in the process, so a worker pays for each file once.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from harness.core.errors import InfraError

FILES_KEY = "files"


class CorruptCache(InfraError):
    """A cached file that is missing or differs from its manifest's record."""


def sha256(path: Path) -> str:
    """SHA-256 hex digest of the file at ``path`` (memoised per path, size and modification time)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(root: Path, skip: Collection[str] = ()) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every regular file under ``root`` by its relative POSIX path, less the names in
    ``skip`` and hidden files (locks, probes)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or path.name in skip or any(part.startswith(".") for part in relative.split("/")):
            continue
        digests[relative] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return digests


def corrupt_files(root: Path, recorded: dict[str, dict[str, Any]], under: str = "") -> list[str]:
    """What differs from ``recorded`` among the files under ``root`` whose paths start with ``under``: one short
    description each (missing, cut or grown, or altered), empty when all match."""
    problems = []
    for relative, record in sorted(recorded.items()):
        if under and not relative.startswith(under):
            continue
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{relative} has {path.stat().st_size:,} bytes, {record['bytes']:,} recorded")
        elif sha256(path) != record["sha256"]:
            problems.append(f"{relative} differs from its recorded SHA-256")
    return problems


def verify_files(root: Path, manifest: dict[str, Any], what: str, fix: str, under: str = "") -> None:
    """``CorruptCache`` naming ``what``, its first bad file and ``fix`` when a file recorded in ``manifest`` (under
    ``under``) is missing or differs; nothing for a manifest written before checksums were recorded."""
    problems = corrupt_files(root, manifest.get(FILES_KEY) or {}, under)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptCache(f"{what} at {root} is corrupt: {problems[0]}{more}", fix)
