"""Hardened runs: every bad input is one line with exit code 2 before anything starts, every fault of the
environment one line with exit code 3, an interrupt exit code 130; no recorded cell is lost or run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.core.records import CellRecord
from harness.core.results import ResultStore
from harness.driver.cli import main
from harness.driver.run_dir import RunLock
from tests.conftest import TESTS, write_sweep

REPO = TESTS.parent
SPEC_BENCH_LINE = '{"question_id": 1, "category": "writing", "turns": ["Write a haiku."]}\n'


def run(tmp_path: Path, capsys, *extra: str, sweep: Path | None = None) -> tuple[int, list[str]]:
    """``specsweep run`` of ``sweep`` (default: tmp_path/sweep.yaml) into tmp_path/results; exit code, stderr lines."""
    code = main(["run", str(sweep or tmp_path / "sweep.yaml"), "--results-dir", str(tmp_path / "results"), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(lines: list[str], expected: str) -> None:
    errors = [line for line in lines if line.startswith("specsweep: error:")]
    assert len(errors) == 1 and expected in errors[0], lines
    assert not any("Traceback" in line for line in lines), lines


# ----------------------------------------------------------------------------- exit code 2: bad input

@pytest.mark.parametrize("case", ["not utf-8", "duplicate key"])
def test_an_unreadable_sweep_file_is_one_line_and_exit_2(tmp_path, capsys, no_start, case):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"name: caf\xe9\n" if case == "not utf-8" else b"name: a\nmodels: {}\nname: b\n")
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, "is not UTF-8 text" if case == "not utf-8" else "key 'name' appears twice (lines 1 and 3)")


def test_a_plugin_with_a_syntax_error_is_one_line_naming_its_line(tmp_path, capsys, no_start):
    (tmp_path / "broken.py").write_text("x = 1\ndef f(:\n")
    write_sweep(tmp_path / "sweep.yaml", plugins=["broken.py"])
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, f"plugins[0]: {tmp_path / 'broken.py'} line 2: syntax error")


@pytest.mark.parametrize("content, expected", [
    ("not json\n", "line 1 is not JSON"),
    ("", "has no prompts"),
    ('{"question_id": 1, "category": "x"}\n', "line 1 lacks question_id or a non-empty list of turns"),
    (b"\xff\xfe", "is not UTF-8 text"),
])
def test_prompt_files_are_checked_on_the_driver_naming_file_and_line(tmp_path, capsys, no_start, content, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content if isinstance(content, bytes) else content.encode())
    write_sweep(tmp_path / "sweep.yaml", prompts=[{"name": "mine", "source": str(prompts)}])
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, "prompts[0].source: ")
    assert expected in lines[0] and str(prompts) in lines[0]


def test_empty_shards_and_a_context_overflow_are_caught_before_anything_starts(tmp_path, capsys, no_start):
    write_sweep(tmp_path / "sweep.yaml", prompts=[{"name": "code", "source": "zoo:code", "count": 2, "shards": 4}])
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, "prompts[0].shards: 4 shards of 2 prompt(s) leave 2 shard(s) empty; use shards: 2 or fewer")
    write_sweep(tmp_path / "sweep.yaml", run={"max_new_tokens": 5000})
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, "run.max_new_tokens: 5000 new tokens do not fit models.targets.target's 1024-token context")


def test_cuda_without_a_gpu_is_refused_and_leaves_no_run_directory(tmp_path, capsys, no_start, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_sweep(tmp_path / "sweep.yaml")
    raw = yaml.safe_load(path.read_text())
    raw["models"]["device"] = "cuda"
    path.write_text(yaml.safe_dump(raw))
    code, lines = run(tmp_path, capsys)
    assert code == 2
    one_line(lines, "models.device: cuda requested but this machine has no GPU")
    assert not (tmp_path / "results").exists()


def test_report_on_an_empty_or_garbled_cells_file_says_which(tmp_path, capsys):
    (tmp_path / "cells.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err.splitlines(), "cells.jsonl is empty")
    (tmp_path / "cells.jsonl").write_text('{"torn": \n')
    assert main(["report", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err.splitlines(), "none of its 1 line(s) is a cell record (line 1: not JSON")


# ----------------------------------------------------------------------------- duplicates

def test_duplicate_cells_are_merged_with_a_notice(tmp_path, capsys):
    from strategies.methods.speculative import SpeculativeParams

    default = SpeculativeParams(draft="small").gamma
    write_sweep(tmp_path / "sweep.yaml", strategies=[
        {"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": [2, 2]}},
        {"name": "speculative", "params": {"draft": "small", "gamma": default}},
        {"name": "speculative", "params": {"draft": "small"}}])  # the same cell once defaults are filled in
    code = main(["run", str(tmp_path / "sweep.yaml"), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0
    assert "note: 2 duplicate cell(s) merged (speculative(draft=small,gamma=2) code[0/1] on target x2; " \
           f"speculative(draft=small,gamma={default}) code[0/1] on target x2)" in captured.err
    assert "3 cells (1 baseline, 2 strategy)" in captured.out


# ----------------------------------------------------------------------------- the run-directory lock

def test_a_second_driver_on_a_run_directory_is_refused_naming_the_holder(tmp_path, capsys, no_start):
    write_sweep(tmp_path / "sweep.yaml")
    run_dir = tmp_path / "results" / "tiny" / "r"
    run_dir.mkdir(parents=True)
    with RunLock(run_dir):
        code, lines = run(tmp_path, capsys, "--resume", str(run_dir))
    assert code == 3
    one_line(lines, f"run directory {run_dir} is in use by another specsweep driver (pid {os.getpid()} on host")


def test_a_lock_left_by_a_dead_driver_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": 0}))
    notes: list[str] = []
    with RunLock(tmp_path, log=notes.append):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert notes and "pid 999999 on host gone" in notes[0]


# ----------------------------------------------------------------------------- faults, resume integrity

def recorded(run_dir: Path) -> list[CellRecord]:
    return list(ResultStore(run_dir).records())


def test_resume_with_another_sweep_is_refused_unless_forced_and_torn_lines_are_reported(tmp_path, tiny_zoo, capsys):
    one_cell = dict(strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 2}}],
                    prompts=[{"name": "code", "source": "zoo:code", "count": 2}],
                    run={"max_new_tokens": 6, "warmup_prompts": 0, "workers": 1, "num_cpus": 1})
    write_sweep(tmp_path / "sweep.yaml", **one_cell)
    code, _ = run(tmp_path, capsys, "--run-name", "r")
    run_dir = tmp_path / "results" / "tiny" / "r"
    assert code == 0 and len(recorded(run_dir)) == 1
    other = write_sweep(tmp_path / "other.yaml", **{**one_cell, "strategies": [
        {"name": "speculative", "params": {"draft": "small", "gamma": 3}}]})
    code, lines = run(tmp_path, capsys, "--resume", str(run_dir), sweep=other)
    assert code == 2
    one_line(lines, f"--resume: {run_dir} was run with a different sweep ('tiny': 1 of this sweep's cells are not "
                    "in it, 1 of its cells are not in this sweep)")
    with open(run_dir / "cells.jsonl", "a") as cells:
        cells.write('{"cell_id": "torn", "sta')  # a crash mid-write
    code, lines = run(tmp_path, capsys, "--resume", str(run_dir), "--force", sweep=other)
    assert code == 0
    assert (run_dir / "sweep.1.yaml").exists() and "gamma: 3" in (run_dir / "sweep.yaml").read_text()
    assert len(recorded(run_dir)) == 2  # the first cell kept, the forced sweep's added
    assert any("warning: 1 line(s) of" in line and "(line 2)" in line for line in lines), lines
    assert "1 line(s) of cells.jsonl could not be read" in (run_dir / "report.md").read_text()
    assert main(["fsck", str(run_dir)]) == 1
    assert "unreadable: line 2: not JSON" in capsys.readouterr().out


def test_a_worker_that_dies_while_starting_is_replaced(tmp_path, tiny_zoo, capsys, monkeypatch):
    budget = tmp_path / "crashes"
    budget.write_text("1")
    monkeypatch.setenv("SPECSWEEP_TEST_CRASHES", str(budget))
    write_sweep(tmp_path / "sweep.yaml", plugins=[str(TESTS / "plugins" / "crash_on_start.py")],
                strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 2}}],
                prompts=[{"name": "code", "source": "zoo:code", "count": 2}],
                run={"max_new_tokens": 6, "warmup_prompts": 0, "workers": 1, "num_cpus": 1, "max_retries": 1})
    code, _ = run(tmp_path, capsys, "--run-name", "r")
    assert code == 0 and budget.read_text() == "0"
    assert [record.ok for record in recorded(tmp_path / "results" / "tiny" / "r")] == [True]
    budget.write_text("5")  # more crashes than run.max_retries allows
    code, lines = run(tmp_path, capsys, "--run-name", "s")
    assert code == 3
    assert any(line.startswith("specsweep: error: workers failed to start 2 times") for line in lines), lines
    assert any(line.startswith("stopped: 0 of 1 cells recorded; resume with specsweep run") for line in lines)
    assert not (tmp_path / "results" / "tiny" / "s" / "cells.jsonl").exists()  # no cell recorded as failed


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1 within 2 s"),
    ("nonsense", "--address 'nonsense' is not host:port"),
])
def test_an_unreachable_cluster_is_one_line_and_exit_3(tmp_path, capsys, tiny_zoo, address, expected):
    write_sweep(tmp_path / "sweep.yaml")
    started = time.monotonic()
    code, lines = run(tmp_path, capsys, "--address", address, "--connect-timeout", "2")
    assert code == 3 and time.monotonic() - started < 60
    one_line(lines, expected)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_stops_with_exit_130_a_partial_report_and_no_ray_left(tmp_path, tiny_zoo, sig):
    # a speculative cell finishes; a strategy that hangs is still in flight when the signal comes
    path = write_sweep(tmp_path / "sweep.yaml", plugins=[str(TESTS / "plugins" / "probes.py")],
                       strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 2}}, {"name": "hang"}],
                       prompts=[{"name": "code", "source": "zoo:code", "count": 2}],
                       run={"max_new_tokens": 24, "warmup_prompts": 0, "workers": 1, "num_cpus": 1})
    run_dir = tmp_path / "results" / "tiny" / "r"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = ray_processes()
    driver = subprocess.Popen([sys.executable, "-m", "harness.driver.cli", "run", str(path), "--results-dir",
                               str(tmp_path / "results"), "--run-name", "r"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not recorded(run_dir):
        time.sleep(0.5)
    assert recorded(run_dir), "no cell finished in time"
    driver.send_signal(sig)
    _, err = driver.communicate(timeout=120)
    kept = recorded(run_dir)
    assert driver.returncode == 130, err
    assert f"interrupted: {len(kept)} of 2 cells recorded; resume with specsweep run {path} --resume {run_dir}" in err
    assert "hang" not in {record.cell["strategy"] for record in kept}
    assert "Traceback" not in err and (run_dir / "report.md").exists()
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not ray_processes() - before, "Ray processes the driver started are still alive"
    assert len({record.cell_id for record in kept}) == len(kept)  # nothing recorded twice


def ray_processes() -> set[str]:
    """Pids of Ray's processes on this host (GCS, raylet, dashboard, workers)."""
    found = subprocess.run(["pgrep", "-f", "gcs_server|raylet|ray::|default_worker|dashboard"],
                           capture_output=True, text=True).stdout.split()
    return set(found)


# ----------------------------------------------------------------------------- trust

def test_plugins_are_imported_only_after_the_rest_validates_and_only_beside_the_sweep_file(tmp_path, capsys,
                                                                                      no_start, monkeypatch):
    sweep_dir, elsewhere = tmp_path / "sweeps", tmp_path / "cwd"
    sweep_dir.mkdir()
    elsewhere.mkdir()
    source = (TESTS / "plugins" / "marker.py").read_text()
    (sweep_dir / "marker.py").write_text(source)
    (elsewhere / "marker.py").write_text(source)  # a decoy in the working directory
    monkeypatch.chdir(elsewhere)
    write_sweep(sweep_dir / "sweep.yaml", plugins=["marker.py"], run={"max_new_tokens": 0})
    code, lines = run(tmp_path, capsys, sweep=sweep_dir / "sweep.yaml")
    assert code == 2
    one_line(lines, "run.max_new_tokens: must be >= 1")
    assert not (sweep_dir / "marker.txt").exists() and not (elsewhere / "marker.txt").exists()
    write_sweep(sweep_dir / "sweep.yaml", plugins=["marker.py"])
    assert main(["run", str(sweep_dir / "sweep.yaml"), "--dry-run"]) == 0
    assert (sweep_dir / "marker.txt").exists() and not (elsewhere / "marker.txt").exists()
    code, lines = run(tmp_path, capsys, "--no-plugins", sweep=sweep_dir / "sweep.yaml")
    assert code == 2
    one_line(lines, "plugins: the sweep imports code (marker.py) and --no-plugins refuses it")


def test_no_plugins_also_refuses_a_runtime_env_that_installs_code(tmp_path, capsys, no_start):
    write_sweep(tmp_path / "sweep.yaml", strategies=[{"name": "speculative", "params": {"draft": "small"},
                                                      "runtime_env": {"pip": ["left-pad"]}}])
    code, lines = run(tmp_path, capsys, "--no-plugins")
    assert code == 2
    one_line(lines, "strategies[0].runtime_env: installs or ships code on the workers (pip) and --no-plugins")
