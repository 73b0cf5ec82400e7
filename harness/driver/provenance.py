"""What a run ran on: the specsweep build (version, commit, dirty flag), the machine, library versions, the
command line, and copies of the files the sweep references (``env.json`` and ``inputs/`` in the run directory).

The commit is looked up in the package's own checkout, not the current directory, so a run started elsewhere
still records it. A copy of specsweep without its git metadata (e.g. a ``ray job submit`` working directory)
reads ``harness/BUILD_INFO.json`` if one was stamped there (``specsweep stamp`` writes it from the checkout).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the harness package
STAMP = PACKAGE_DIR / "BUILD_INFO.json"
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "ray", "deepspeed", "datasets", "numpy", "pandas")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def build_info() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}`` of the specsweep code in use."""
    try:
        version = metadata.version("specsweep")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = _git("rev-parse", "--short", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        return {"version": version, "commit": commit, "dirty": bool(status)}
    if STAMP.exists():
        return {"version": version, **json.loads(STAMP.read_text())}
    return {"version": version, "commit": "unknown", "dirty": None}


def build_label(info: dict[str, Any] | None = None) -> str:
    """The commit of ``info`` (default: the code in use) as recorded with results: ``<commit>[+dirty]``."""
    info = info or build_info()
    return f"{info['commit']}{'+dirty' if info.get('dirty') else ''}"


def stamp() -> Path:
    """Write ``BUILD_INFO.json`` (commit and dirty flag) into the package, for copies without git metadata."""
    info = build_info()
    STAMP.write_text(json.dumps({"commit": info["commit"], "dirty": info["dirty"]}) + "\n")
    return STAMP


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any]:
    """GPU names, driver and CUDA versions as torch and nvidia-smi see them (empty without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    info: dict[str, Any] = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                            "cuda": torch.version.cuda}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def write_environment(run_dir: Path, argv: list[str], referenced: list[Path]) -> Path:
    """Write ``env.json`` and copy each ``referenced`` file into ``inputs/`` of ``run_dir``."""
    inputs = run_dir / "inputs"
    copied = []
    for path in referenced:
        if path.is_file():
            inputs.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, inputs / path.name)
            copied.append(str(path))
    env = {"specsweep": build_info(), "python": platform.python_version(), "platform": platform.platform(),
           "host": platform.node(), "cpu": cpu_model(), "gpu": gpu_info(), "libraries": library_versions(),
           "command": ["specsweep", *argv], "inputs": copied}
    path = run_dir / "env.json"
    path.write_text(json.dumps(env, indent=2) + "\n")
    return path
