"""``specsweep fsck``'s check of the caches under ``$SPECSWEEP_HOME``: every zoo build, trained artefact and
converted model whose manifest records checksums is verified file by file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.checksums import FILES_KEY, corrupt_files
from harness.core.models import ARTIFACT_MANIFEST
from harness.core.sources import SOURCE_FILE
from harness.core.zoo_spec import ZOO_MANIFEST

# (manifest file, glob of the manifests under the home, what the cache is, the command that rebuilds one)
CACHES = (
    (ZOO_MANIFEST, "zoo/*/" + ZOO_MANIFEST, "zoo build", "`specsweep zoo build` rebuilds it"),
    (ARTIFACT_MANIFEST, "artifacts/*/*/" + ARTIFACT_MANIFEST, "trained artefact",
     "delete it: the next sweep that uses it retrains it"),
    (SOURCE_FILE, "models/*/" + SOURCE_FILE, "converted model", "delete it: the next run converts it again"),
)


@dataclass
class CacheReport:
    """What the cache check found: caches verified, corrupt ones (one line each) and ones without checksums."""

    verified: int = 0
    corrupt: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report, one finding per line."""
        lines = [f"caches: {self.verified} verified against their checksums"]
        lines += [f"corrupt: {line}" for line in self.corrupt]
        lines += [f"no checksums recorded (built before they were): {path}" for path in self.unrecorded]
        return lines


def check_caches(home: Path) -> CacheReport:
    """Verify every cache under ``home`` whose manifest records checksums."""
    report = CacheReport()
    for manifest_name, pattern, what, fix in CACHES:
        for manifest_path in sorted(home.glob(pattern)):
            directory = manifest_path.parent
            try:
                recorded = json.loads(manifest_path.read_text()).get(FILES_KEY)
            except (OSError, ValueError, AttributeError):
                report.corrupt.append(f"{what} {directory}: {manifest_name} does not read; {fix}")
                continue
            if not recorded:
                report.unrecorded.append(str(directory))
                continue
            problems = corrupt_files(directory, recorded)
            if problems:
                report.corrupt.append(f"{what} {directory}: {'; '.join(problems)}; {fix}")
            else:
                report.verified += 1
    return report
