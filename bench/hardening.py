"""Malformed inputs and injected faults, run as a user would (``specsweep`` in a subprocess), as a markdown table:
each case's exit code, the line it printed, whether a traceback showed, and (for faults) whether any recorded
cell was lost or recorded twice.

    python bench/hardening.py [--kind inputs|faults|all] [--out results/hardening.md] [--only NAME ...]

Sweeps run on the tiny test zoo (``tests/tiny_zoo.yaml``, built once under ``$SPECSWEEP_HOME``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_ZOO = yaml.safe_load((REPO / "tests" / "tiny_zoo.yaml").read_text())
CRASH_PLUGIN = REPO / "tests" / "plugins" / "crash_on_start.py"
CLI = [sys.executable, "-m", "harness.driver.cli"]  # the specsweep command, run from this checkout


def base_sweep(**overrides) -> dict:
    sweep = {
        "name": "tiny",
        "zoo": TINY_ZOO,
        "models": {"target": "zoo:target", "drafts": {"small": "zoo:draft-1l"}, "device": "cpu"},
        "prompts": [{"name": "code", "source": "zoo:code", "count": 2}],
        "strategies": [{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": [2, 3]}}],
        "run": {"max_new_tokens": 8, "warmup_prompts": 0, "workers": 1, "num_cpus": 1},
    }
    sweep.update(overrides)
    return sweep


@dataclass
class Case:
    """One malformed input or fault: how to set it up, the command's extra arguments, the exit code expected."""

    name: str
    expected: int
    sweep: dict | None = None  # written to sweep.yaml (None: the setup writes it)
    args: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] | None = None
    fault: Callable[[Path, list[str], dict], tuple[int, str]] | None = None  # runs the command itself
    command: str = "run"


def bad(case: str, **overrides) -> Case:
    """A sweep file with ``overrides`` that must be refused as bad input."""
    return Case(case, 2, base_sweep(**overrides))


def write_file(name: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        (work / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def raw_sweep(content: bytes) -> Callable[[Path], None]:
    return write_file("sweep.yaml", content)


# ----------------------------------------------------------------------------- malformed inputs

MODELS = {"target": "zoo:target", "drafts": {"small": "zoo:draft-1l"}, "device": "cpu"}
INPUTS = [
    Case("sweep file missing", 2, None, setup=lambda work: None),
    Case("sweep file not UTF-8", 2, None, setup=raw_sweep(b"name: caf\xe9\n")),
    Case("sweep file is YAML with a syntax error", 2, None, setup=raw_sweep(b"name: [x\n")),
    Case("duplicate YAML key", 2, None, setup=raw_sweep(b"name: a\nname: b\n")),
    Case("sweep file is a list", 2, None, setup=raw_sweep(b"- name: a\n")),
    bad("unknown top-level key (typo)", modles={}),
    bad("bad sweep name", name="my sweep!"),
    bad("unknown dtype", models={**MODELS, "dtype": "float8"}),
    bad("unknown device", models={**MODELS, "device": "tpu"}),
    bad("unknown zoo model", models={**MODELS, "target": "zoo:giant"}),
    bad("missing local model path", models={**MODELS, "target": "./no/such/model"}),
    bad("no target", models={"drafts": {"small": "zoo:draft-1l"}}),
    bad("unknown strategy (typo)", strategies=[{"name": "speculativ"}]),
    bad("param of the wrong type", strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": "four"}}]),
    bad("param out of range", strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 0}}]),
    bad("unknown param (typo)", strategies=[{"name": "speculative", "params": {"draft": "small", "gama": 2}}]),
    bad("draft not defined", strategies=[{"name": "speculative", "params": {"draft": "huge"}}]),
    bad("grid value not a list", strategies=[{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": 4}}]),
    bad("grid key also in params", strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 2},
                                                    "grid": {"gamma": [3]}}]),
    bad("bad k-matrix", strategies=[{"name": "cascade", "params": {"drafts": ["small"], "k_matrix": [[0]]}}]),
    bad("artefact not in train", strategies=[{"name": "eagle", "params": {"head": "missing"}}]),
    bad("unknown run key (typo)", run={"temprature": 0.5}),
    bad("run value of the wrong type", run={"max_new_tokens": "many"}),
    bad("negative temperature", run={"temperature": -1}),
    bad("unknown pairing", run={"pairing": "sometimes"}),
    bad("max_new_tokens beyond the model's context", run={"max_new_tokens": 5000}),
    bad("shards left empty", prompts=[{"name": "code", "source": "zoo:code", "count": 2, "shards": 4}]),
    bad("unknown zoo prompt set", prompts=[{"name": "x", "source": "zoo:poetry"}]),
    bad("missing prompt file", prompts=[{"name": "x", "source": "missing.jsonl"}]),
    bad("repeated prompt set names", prompts=[{"name": "x", "source": "zoo:code"}, {"name": "x", "source": "zoo:math"}]),
    Case("prompt file with a malformed line", 2, base_sweep(prompts=[{"name": "x", "source": "p.jsonl"}]),
         setup=write_file("p.jsonl", '{"question_id": 1, "turns": ["a"]}\nnot json\n')),
    Case("empty prompt file", 2, base_sweep(prompts=[{"name": "x", "source": "p.jsonl"}]), setup=write_file("p.jsonl", "")),
    Case("prompt line without turns", 2, base_sweep(prompts=[{"name": "x", "source": "p.jsonl"}]),
         setup=write_file("p.jsonl", '{"question_id": 1, "category": "x"}\n')),
    Case("prompt file not UTF-8", 2, base_sweep(prompts=[{"name": "x", "source": "p.jsonl"}]),
         setup=write_file("p.jsonl", b"\xff\xfe{}")),
    Case("plugin with a syntax error", 2, base_sweep(plugins=["broken.py"]), setup=write_file("broken.py", "def f(:\n")),
    Case("plugin that raises on import", 2, base_sweep(plugins=["raises.py"]),
         setup=write_file("raises.py", "raise RuntimeError('no licence key')\n")),
    bad("plugin module not installed", plugins=["no_such_module_xyz"]),
    Case("plugin path looked up beside the sweep file, not in the cwd", 2, base_sweep(plugins=["elsewhere.py"])),
    Case("--no-plugins with plugins", 2, base_sweep(plugins=["ok.py"]), args=["--no-plugins"],
         setup=write_file("ok.py", "\n")),
    Case("--no-plugins with a runtime_env that installs", 2,
         base_sweep(strategies=[{"name": "speculative", "params": {"draft": "small"}, "runtime_env": {"pip": ["x"]}}]),
         args=["--no-plugins"]),
    Case("device cuda without a GPU", 2, base_sweep(models={**MODELS, "device": "cuda"})),
    Case("--set on an index that does not exist", 2, base_sweep(), args=["--set", "prompts[3].count=2"]),
    Case("--resume of a directory that does not exist", 2, base_sweep(), args=["--resume", "nowhere"]),
    Case("training config file missing", 2, base_sweep(train={"head": "missing.yaml"})),
    Case("training config unknown key", 2, base_sweep(train={"head": {"kind": "eagle", "stepz": 3}})),
    Case("report on an empty cells.jsonl", 2, None, command="report", setup=write_file("cells.jsonl", "")),
    Case("report on a garbled cells.jsonl", 2, None, command="report", setup=write_file("cells.jsonl", "{garbage\n")),
    Case("fsck of a directory without results", 2, None, command="fsck", setup=lambda work: None),
    # second pass: numbers that are not numbers
    bad("temperature .nan", run={"temperature": float("nan")}),
    bad("temperature .inf", run={"temperature": float("inf")}),
    bad("strategy param .nan", strategies=[{"name": "hf_assisted", "params": {"draft": "small",
                                                                            "confidence_threshold": float("nan")}}]),
    bad("a number written as quoted text", run={"temperature": "0.5"}),
    bad("an integer setting written as 1e3", run={"max_new_tokens": 1000.0}),
    Case("an exponent without a dot (1e3) is a number", 0, None, args=["--dry-run"],
         setup=raw_sweep(yaml.safe_dump(base_sweep()).replace("num_cpus: 1", "num_cpus: 1\n  cell_timeout_s: 1e3")
                         .encode())),
    # text that is valid but was refused
    Case("prompt line holding a raw U+2028 inside a string", 0, base_sweep(prompts=[{"name": "x", "source": "p.jsonl"}]),
         args=["--dry-run"], setup=write_file("p.jsonl", '{"question_id": 1, "turns": ["one\u2028two"]}\n')),
    Case("malformed prompt line: the error keeps its column", 2, base_sweep(prompts=[{"name": "x", "source": "p.jsonl"}]),
         setup=write_file("p.jsonl", '{"question_id": 1, "turns": ["a"],}\n')),
    # paths that escape
    Case("--run-name that climbs out (../../escape)", 2, base_sweep(), args=["--run-name", "../../escape"]),
    Case("--run-name that is an absolute path", 2, base_sweep(), args=["--run-name", "/tmp/specsweep-escape"]),
    # every problem at once
    bad("one strategy entry with three problems", strategies=[{"name": "speculative", "params": {
        "draft": "small", "gamma": 0, "schedule": "sometimes", "gama": 2}}]),
    Case("several bad --set values", 2, base_sweep(), args=["--set", "run.max_new_tokens", "--set", "prompts[7].count=1",
                                                            "--set", "run.temperature=.nan"]),
    bad("bad params, grid and runtime_env in one entry", strategies=[{"name": "speculative", "params": [1],
                                                                      "grid": {"gamma": 3}, "runtime_env": "x"}]),
    bad("run.cell_timeout_s of 0", run={"cell_timeout_s": 0}),
]


# ----------------------------------------------------------------------------- faults

def records(run_dir: Path) -> list[dict]:
    path = run_dir / "cells.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def spawn(work: Path, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for_record(run_dir: Path, count: int = 1, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(records(run_dir)) < count and time.monotonic() < deadline:
        time.sleep(0.3)


def signal_mid_sweep(sig: int) -> Callable[[Path, list[str], dict], tuple[int, str]]:
    def fault(work: Path, args: list[str], env: dict) -> tuple[int, str]:
        run_dir = work / "results" / "tiny" / "r"
        driver = spawn(work, [*args, "--run-name", "r"], env)
        wait_for_record(run_dir)
        driver.send_signal(sig)
        _, err = driver.communicate(timeout=180)
        if sig == signal.SIGKILL:
            err = f"(killed) {len(records(run_dir))} recorded"
        resumed = subprocess.run([*CLI, *args, "--run-name", "r"], cwd=work, env=env,
                                 text=True, capture_output=True)
        return driver.returncode, err + "\n" + f"resume: exit {resumed.returncode}"
    return fault


def crash_starts(times: int) -> Callable[[Path, list[str], dict], tuple[int, str]]:
    def fault(work: Path, args: list[str], env: dict) -> tuple[int, str]:
        (work / "crashes").write_text(str(times))
        done = subprocess.run([*CLI, *args], cwd=work, text=True, capture_output=True,
                              env={**env, "SPECSWEEP_TEST_CRASHES": str(work / "crashes")})
        ok = [line for line in done.stdout.splitlines() if "cells ok" in line]
        replaced = [line for line in (work / "results").rglob("sweep.log") for line in line.read_text().splitlines()
                    if "failed to start" in line]
        if done.returncode:
            return done.returncode, done.stderr
        return done.returncode, "\n".join([*(line.split(" INFO ")[-1] for line in replaced[:1]), *ok]) or done.stderr
    return fault


def second_driver(work: Path, args: list[str], env: dict) -> tuple[int, str]:
    first = spawn(work, [*args, "--run-name", "r"], env)
    deadline = time.monotonic() + 120
    while not (work / "results" / "tiny" / "r" / "plan.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    second = subprocess.run([*CLI, *args, "--run-name", "r"], cwd=work, env=env,
                            text=True, capture_output=True)
    first.communicate(timeout=600)
    return second.returncode, second.stderr


def torn_line(work: Path, args: list[str], env: dict) -> tuple[int, str]:
    subprocess.run([*CLI, *args, "--run-name", "r"], cwd=work, env=env,
                   capture_output=True)
    with open(work / "results" / "tiny" / "r" / "cells.jsonl", "a") as cells:
        cells.write('{"cell_id": "x", "sta')
    done = subprocess.run([*CLI, *args, "--run-name", "r"], cwd=work, env=env,
                          text=True, capture_output=True)
    return done.returncode, done.stderr


def with_ray_start(work: Path, args: list[str], env: dict) -> tuple[int, str]:
    subprocess.run(["ray", "start", "--head", "--num-cpus", "1", "--disable-usage-stats"], env=env,
                   capture_output=True)
    try:
        done = subprocess.run([*CLI, *args], cwd=work, env=env, text=True,
                              capture_output=True)
        joined = subprocess.run([*CLI, *args, "--address", "auto", "--run-name",
                                 "joined"], cwd=work, env=env, text=True, capture_output=True)
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
    return done.returncode, f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}\n" \
                            f"--address auto: exit {joined.returncode}"


def other_sweep(work: Path, args: list[str], env: dict) -> tuple[int, str]:
    subprocess.run([*CLI, *args, "--run-name", "r"], cwd=work, env=env,
                   capture_output=True)
    other = base_sweep(strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 5}}])
    (work / "other.yaml").write_text(yaml.safe_dump(other))
    done = subprocess.run([*CLI, "run", "other.yaml", "--results-dir", "results",
                           "--resume", "results/tiny/r"], cwd=work, env=env, text=True, capture_output=True)
    return done.returncode, done.stderr


def isolated_home(corrupt: str | None = None) -> Callable[[Path, dict], dict]:
    """An environment whose $SPECSWEEP_HOME (in the case's work directory) holds a copy of the tiny zoo, with the
    first weight file of zoo model ``corrupt`` cut to half its size."""
    def prepare(work: Path, env: dict) -> dict:
        from harness.core.zoo_spec import ZooConfig, zoo_dir

        home = work / "home"
        source_env = {**os.environ, **env}
        built = Path(source_env.get("SPECSWEEP_HOME") or Path.home() / ".cache" / "specsweep") / "zoo" / \
            zoo_dir(ZooConfig.from_dict(TINY_ZOO)).name
        if not (built / "manifest.json").exists():  # build the tiny zoo in the shared home first
            subprocess.run([*CLI, "zoo", "build", "--sweep", "sweep.yaml"], cwd=work,
                           env=env, capture_output=True, check=True)
        shutil.copytree(built, home / "zoo" / built.name)
        if corrupt:
            weights = sorted((home / "zoo" / built.name / corrupt).glob("*.safetensors"))[0]
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return {**env, "SPECSWEEP_HOME": str(home)}
    return prepare


def in_home(prepare: Callable[[Path, dict], dict], *commands: list[str]) -> Callable[[Path, list[str], dict],
                                                                                    tuple[int, str]]:
    """Run ``commands`` (``None`` standing for the case's own arguments) in the prepared environment; the last
    one's exit code and output count, the earlier ones' exit codes are shown."""
    def fault(work: Path, args: list[str], env: dict) -> tuple[int, str]:
        env = prepare(work, env)
        shown = []
        for command in commands:
            done = subprocess.run([*CLI, *(command or args)], cwd=work, env=env,
                                  text=True, capture_output=True)
            shown.append(f"{(command or args)[0]}: exit {done.returncode}")
        logs = "".join(path.read_text() for path in (work / "results").rglob("sweep.log"))
        lines = [line.split(" INFO ")[-1] for line in (done.stderr + done.stdout + logs).splitlines()
                 if "corrupt" in line or "error" in line]
        return done.returncode, "\n".join([*lines[:2], *shown[:-1]]) or done.stderr
    return fault


def failed_cells(work: Path, args: list[str], env: dict) -> tuple[int, str]:
    """Run the case; its message is each failed cell's recorded error."""
    done = subprocess.run([*CLI, *args], cwd=work, env=env, text=True,
                          capture_output=True)
    errors = [f"{record['label']}: {record['error']}" for cells in (work / "results").rglob("cells.jsonl")
              for record in records(cells.parent) if record["status"] != "ok"]
    return done.returncode, "\n".join(errors) or done.stderr


def with_env(command: list[str] | None = None, **variables: str) -> Callable[[Path, list[str], dict], tuple[int, str]]:
    """Run ``command`` (else the case's own) with extra environment variables (``{work}`` in a value names the
    case's work directory)."""
    def fault(work: Path, args: list[str], env: dict) -> tuple[int, str]:
        extra = {key: value.format(work=work) for key, value in variables.items()}
        done = subprocess.run([*CLI, *(command or args)], cwd=work,
                              env={**env, **extra}, text=True, capture_output=True)
        return done.returncode, done.stderr
    return fault


HUB_MODEL = {**MODELS, "target": "HuggingFaceTB/SmolLM2-135M-Instruct", "drafts": {}}
HANGS = base_sweep(plugins=[str(REPO / "tests" / "plugins" / "probes.py")],
                   strategies=[{"name": "hang"}, {"name": "speculative", "params": {"draft": "small", "gamma": 2}}],
                   run={"max_new_tokens": 8, "warmup_prompts": 0, "workers": 1, "num_cpus": 1, "cell_timeout_s": 20})
LONGER = base_sweep(strategies=[{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": [1, 2, 3, 4, 5]}}],
                    run={"max_new_tokens": 32, "warmup_prompts": 0, "workers": 1, "num_cpus": 1})
FAULTS = [
    Case("worker dies once while starting", 0, base_sweep(plugins=[str(CRASH_PLUGIN)]), fault=crash_starts(1)),
    Case("workers die on every start", 3, base_sweep(plugins=[str(CRASH_PLUGIN)]), fault=crash_starts(99)),
    Case("--address with nothing listening", 3, base_sweep(), args=["--address", "127.0.0.1:1", "--connect-timeout", "5"]),
    Case("--address auto with no cluster on this host", 3, base_sweep(), args=["--address", "auto"]),
    Case("results directory is a file", 3, base_sweep(), args=["--results-dir", "afile"], setup=write_file("afile", "")),
    Case("second driver on the same run directory", 3, base_sweep(), fault=second_driver),
    Case("Ctrl-C (SIGINT) mid-sweep, then resume", 130, LONGER, fault=signal_mid_sweep(signal.SIGINT)),
    Case("SIGTERM mid-sweep, then resume", 130, LONGER, fault=signal_mid_sweep(signal.SIGTERM)),
    Case("SIGKILL of the driver mid-sweep, then resume", -9, LONGER, fault=signal_mid_sweep(signal.SIGKILL)),
    Case("torn line in cells.jsonl, then resume", 0, base_sweep(), fault=torn_line),
    Case("resume with a different sweep", 2, base_sweep(), fault=other_sweep),
    Case("plain run while a `ray start` cluster runs", 0, base_sweep(), fault=with_ray_start),
    # second pass: $SPECSWEEP_HOME checked before any work
    Case("$SPECSWEEP_HOME is a regular file", 3, base_sweep(), setup=write_file("homefile", ""),
         fault=with_env(SPECSWEEP_HOME="{work}/homefile")),
    Case("$SPECSWEEP_HOME below a regular file", 3, base_sweep(), setup=write_file("homefile", ""),
         fault=with_env(SPECSWEEP_HOME="{work}/homefile/cache")),
    Case("$SPECSWEEP_HOME that cannot be created (/proc)", 3, base_sweep(),
         fault=with_env(SPECSWEEP_HOME="/proc/specsweep-home")),
    Case("train with $SPECSWEEP_HOME a regular file", 3, None, setup=write_file("homefile", ""),
         fault=with_env(["train", "eagle", str(REPO / "configs" / "train" / "eagle_zoo.yaml")],
                        SPECSWEEP_HOME="{work}/homefile")),
    # caches that rot
    Case("zoo weight file cut to half: the run rebuilds the zoo", 0, base_sweep(),
         fault=in_home(isolated_home("target"), None)),
    Case("zoo weight file cut to half: fsck names it", 1, base_sweep(),
         fault=in_home(isolated_home("draft-1l"), ["fsck"])),
    Case("zoo weight file cut to half: zoo build rebuilds it, then fsck is clean", 0, base_sweep(),
         fault=in_home(isolated_home("target"), ["zoo", "build", "--sweep", "sweep.yaml"], ["fsck"])),
    # cells that hang
    Case("a strategy whose generate never returns (run.cell_timeout_s 20)", 1, HANGS, fault=failed_cells),
    # hubs that are not there
    Case("hub model with HF_HUB_OFFLINE=1", 2, base_sweep(models=HUB_MODEL,
                                                          strategies=[{"name": "prompt_lookup"}]),
         fault=with_env(HF_HUB_OFFLINE="1")),
    Case("hub model with no route to the hub", 2, base_sweep(models=HUB_MODEL, strategies=[{"name": "prompt_lookup"}]),
         fault=with_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")),
    Case("hf: prompt set with HF_HUB_OFFLINE=1", 2,
         base_sweep(prompts=[{"name": "x", "source": "hf:openai/gsm8k", "split": "test", "field": "question"}]),
         fault=with_env(HF_HUB_OFFLINE="1")),
]


def run_case(case: Case, root: Path, env: dict) -> dict:
    work = root / case.name.replace(" ", "_").replace("/", "_")[:60]
    work.mkdir(parents=True)
    if case.sweep is not None:
        (work / "sweep.yaml").write_text(yaml.safe_dump(case.sweep, sort_keys=False))
    if case.setup:
        case.setup(work)
    if case.name.startswith("plugin path"):
        (work / "cwd").mkdir()
        (work / "cwd" / "elsewhere.py").write_text("\n")
    if case.command == "run":
        args = ["run", str(work / "sweep.yaml"), "--results-dir", "results", "-q", *case.args]
    else:
        args = [case.command, str(work)]
    started = time.monotonic()
    if case.fault:
        code, err = case.fault(work, args, env)
    else:
        cwd = work / "cwd" if (work / "cwd").exists() else work
        done = subprocess.run([*CLI, *args], cwd=cwd, env=env, text=True,
                              capture_output=True)
        code, err = done.returncode, done.stderr
    if code == 0 and case.command == "run" and not case.fault:
        err = "\n".join(line for line in done.stdout.splitlines() if "cells ok" in line)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("specsweep: error:", "interrupted:", "stopped:"))]
    shown = errors or [line for line in lines if "warning" in line or "note" in line or "resume" in line] or lines[-1:]
    twice = 0
    for cells_file in (work / "results").rglob("cells.jsonl"):
        ids = [record["cell_id"] for record in records(cells_file.parent)]
        twice += len(ids) - len(set(ids))
    return {"case": case.name, "expected": case.expected, "exit": code, "ok": code == case.expected,
            "traceback": "Traceback" in err, "message": " / ".join(shown)[:400],
            "recorded twice": twice, "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/hardening.md")
    parser.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    parser.add_argument("--kind", choices=("inputs", "faults", "all"), default="all")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cases = {"inputs": INPUTS, "faults": FAULTS, "all": [*INPUTS, *FAULTS]}[args.kind]
    if args.only:
        cases = [case for case in cases if any(part in case.name for part in args.only)]
    root = Path(tempfile.mkdtemp(prefix="hardening-"))
    rows = []
    try:
        for case in cases:
            row = run_case(case, root, env)
            rows.append(row)
            print(f"{'ok ' if row['ok'] else 'BAD'} exit {row['exit']:>4} {row['case']}: {row['message'][:150]}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = ["| # | case | exit (expected) | message | traceback | recorded twice |", "|---|---|---|---|---|---|"]
    for index, row in enumerate(rows, start=1):
        message = row["message"].replace("|", "\\|")
        lines.append(f"| {index} | {row['case']} | {row['exit']} ({row['expected']}) | {message} | "
                     f"{'yes' if row['traceback'] else 'no'} | {row['recorded twice']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    failed = [row["case"] for row in rows if not row["ok"] or row["traceback"] or row["recorded twice"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases as expected; table: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
