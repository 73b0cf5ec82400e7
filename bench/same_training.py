"""Do two checkouts train the same? For refactors of the training code that must keep behaviour.

Trains one small artefact of every Ray Train kind (eagle, draft, dllm, adapters, alora, router, and one
adaptive-drafts round) on the tiny test zoo, in a fresh ``$SPECSWEEP_HOME``, and writes each artefact's key, the
SHA-256 of every weight file, and its metrics (timed values left out) to a JSON file. Run it once per checkout,
then compare the two files:

    PYTHONPATH=<old checkout> python bench/same_training.py train /tmp/before.json
    python bench/same_training.py train /tmp/after.json
    python bench/same_training.py compare /tmp/before.json /tmp/after.json

``compare`` prints each kind whose key, weights or metrics differ and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
DATA = {"sources": ["zoo:code", "zoo:prose"], "samples": 48, "seq_len": 32, "shards": 1, "batch_size": 16}
LAUNCH = {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 1}
CONFIGS: dict[str, dict[str, Any]] = {
    "eagle": {"kind": "eagle", "data": DATA, "steps": 12, "batch_size": 4, "lr": 0.003, "warmup_steps": 3},
    "draft": {"kind": "draft", "layers": 1, "data": DATA, "steps": 12, "batch_size": 4, "warmup_steps": 3},
    "dllm": {"kind": "dllm", "data": DATA, "steps": 12, "batch_size": 4, "warmup_steps": 3},
    "adapters": {"kind": "adapters", "domains": {"code": ["zoo:code"], "prose": ["zoo:prose"]}, "samples": 40,
                 "seq_len": 32, "steps": 8, "batch_size": 4, "warmup_steps": 3},
    "alora": {"kind": "alora", "samples": 40, "prefix_tokens": 16, "answer_tokens": 8, "steps": 8, "batch_size": 4},
    "router": {"kind": "router", "prompts_per_domain": 40, "heldout_per_domain": 10, "steps": 30, "batch_size": 16},
}
ADAPTIVE = {"name": "same-training", "domain": "math", "rounds": 1, "prompts_per_round": 3, "heldout_prompts": 2,
            "gamma": 3, "max_new_tokens": 24, "threshold": 1.01, "retrain_every": 2, "steps": 4, "batch_size": 2,
            "launch": LAUNCH}


def weight_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every weight file under ``directory``, by relative path."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and path.suffix in WEIGHT_SUFFIXES}


def without_times(value: Any) -> Any:
    """``value`` without its timed entries (``*_seconds``, and the adaptive rounds' measured speedups), which differ
    from run to run."""
    if isinstance(value, dict):
        return {key: without_times(item) for key, item in value.items()
                if not str(key).endswith("_seconds") and "speedup" not in str(key)}
    if isinstance(value, list):
        return [without_times(item) for item in value]
    return value


def train_all(out: Path) -> None:
    """Train every kind's small artefact in a fresh home and write what identifies each to ``out``."""
    home = Path(tempfile.mkdtemp(prefix="same-training-"))
    os.environ["SPECSWEEP_HOME"] = str(home)
    from harness.core.local_ray import start_local_ray
    from harness.core.zoo_spec import ZooConfig
    from training.adaptive import load_adaptive_config, run_adaptive
    from training.artifacts import build_artifact, load_train_config
    from training.zoo import build_zoo

    zoo = ZooConfig.from_dict(yaml.safe_load((ROOT / "tests" / "tiny_zoo.yaml").read_text()))
    build_zoo(zoo, log=lambda message: None)
    start_local_ray(2, log_to_driver=False)
    results: dict[str, Any] = {}
    for kind, config in CONFIGS.items():
        request = load_train_config({**config, "launch": LAUNCH}, kind, home, zoo)
        manifest = build_artifact(request, log=lambda message: None)
        results[kind] = {"key": request.directory.name, "weights": weight_digests(request.directory),
                         "metrics": without_times(manifest["metrics"])}
        print(f"{kind}: {request.directory.name}", flush=True)
    path = home / "adaptive.yaml"
    path.write_text(yaml.safe_dump(ADAPTIVE))
    rows = run_adaptive(load_adaptive_config(path, zoo.model_names), zoo, home / "adaptive-run",
                        log=lambda message: None)
    adapters = home / "artifacts" / "adaptive"
    results["adaptive"] = {"key": sorted(path.name for path in adapters.iterdir()), "weights": weight_digests(adapters),
                           "metrics": without_times(rows)}
    out.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    print(f"wrote {out}")


def compare(before: Path, after: Path) -> int:
    """Print each kind whose key, weights or metrics differ; 1 if any does."""
    old, new = without_times(json.loads(before.read_text())), without_times(json.loads(after.read_text()))
    differing = 0
    for kind in sorted(set(old) | set(new)):
        parts = [part for part in ("key", "weights", "metrics") if old.get(kind, {}).get(part) != new.get(kind, {}).get(part)]
        print(f"{kind}: {'same' if not parts else 'differs in ' + ', '.join(parts)}")
        differing += bool(parts)
    print(f"{len(set(old) | set(new)) - differing} of {len(set(old) | set(new))} kinds train the same")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train every kind's small artefact; write what identifies each")
    train.add_argument("out", type=Path)
    diff = commands.add_parser("compare", help="compare two files written by train")
    diff.add_argument("before", type=Path)
    diff.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "train":
        train_all(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
