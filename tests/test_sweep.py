"""End to end: a sweep through Ray writes cells.jsonl and a report; resume skips finished cells."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.results import ResultStore
from tests.conftest import write_sweep


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_cell_sweep_through_ray(tmp_path, tiny_zoo, ray_local, capsys):
    path = write_sweep(tmp_path / "sweep.yaml")
    results = tmp_path / "results"
    code = main(["run", str(path), "--results-dir", str(results), "--run-name", "r1"])
    out = capsys.readouterr().out
    run_dir = results / "tiny" / "r1"
    assert code == 0, out
    assert f"report: {run_dir / 'report.md'}" in out
    records = list(ResultStore(run_dir).records())
    assert {r["status"] for r in records} == {"ok"}
    baselines = [r for r in records if r["kind"] == "baseline"]
    records = [r for r in records if r["kind"] == "strategy"]
    assert len(baselines) == 1 and len(records) == 2
    assert sorted(r["cell"]["params"]["gamma"] for r in records) == [2, 3]
    for record in records:
        assert record["paired_with"]["cell_id"] == baselines[0]["cell_id"]
        assert len(record["prompts"]) == 3
        for prompt in record["prompts"]:
            turn = prompt["turns"][0]
            assert turn["tokens_match"] is True
            assert turn["strategy"]["tokens"] == turn["baseline"]["tokens"]
    report = (run_dir / "report.md").read_text()
    assert "Speedup by strategy and prompt set" in report and "speculative" in report
    assert (run_dir / "cells.csv").exists() and (run_dir / "speedup.png").stat().st_size > 0

    # Re-running into the same run directory skips every finished cell.
    code = main(["run", str(path), "--results-dir", str(results), "--run-name", "r1"])
    assert code == 0
    assert len(list(ResultStore(run_dir).records())) == 3


def test_failing_strategy_is_recorded_and_sweep_goes_on(tmp_path, tiny_zoo, ray_local, capsys):
    """A cell whose draft cannot load is recorded failed with its error; the other cell succeeds; exit code 1."""
    broken = tmp_path / "broken-draft"
    broken.mkdir()
    path = write_sweep(
        tmp_path / "sweep.yaml",
        models={"target": "zoo:target", "drafts": {"small": "zoo:draft-1l", "broken": str(broken)}, "device": "cpu"},
        strategies=[{"name": "speculative", "params": {"gamma": 2}, "grid": {"draft": ["small", "broken"]}}],
    )
    code = main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run-name", "r"])
    assert code == 1
    records = {r["cell"]["params"]["draft"]: r for r in ResultStore(tmp_path / "results" / "tiny" / "r").records()
               if r["kind"] == "strategy"}
    assert records["small"]["status"] == "ok"
    assert records["broken"]["status"] == "failed" and records["broken"]["error"]
    assert "1 failed" in capsys.readouterr().out


def test_torn_last_line_is_tolerated(tmp_path):
    store = ResultStore(tmp_path)
    store.append({"cell_id": "a", "status": "ok"})
    with open(store.path, "a") as handle:
        handle.write('{"cell_id": "b", "sta')  # a crash mid-write
    assert [r["cell_id"] for r in store.records()] == ["a"]
    store.append({"cell_id": "c", "status": "ok"})
    assert [r["cell_id"] for r in store.records()] == ["a", "c"]
    assert all(json.loads(line) for line in store.path.read_text().splitlines() if line.startswith('{"cell_id":"'))
