"""End to end: a sweep through Ray writes cells.jsonl and a report; resume skips finished cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.local_ray import start_local_ray
from harness.core.records import (SCHEMA_VERSION, CellRecord, Environment, PromptRecord, RecordError, SideRecord,
                                  TurnRecord)
from harness.core.results import ResultStore
from harness.driver.cli import main
from tests.conftest import TESTS, write_sweep


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_local_ray(2, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_local_ray_runs_its_workers_at_the_drivers_niceness(ray_local):
    # Ray's default (15) would starve the cells and training jobs on any machine with other load; the driver
    # may itself run niced (a CI job started with `nice`), and the workers follow it, not a fixed level
    import os

    assert ray_local.get(ray_local.remote(lambda: os.nice(0)).remote()) == os.nice(0)


def test_a_local_ray_never_asks_another_clusters_state_api(ray_local):
    """Ray Train's placement-group cleaner asks the State API whether its controller lives; on a machine where a
    later cluster has a dashboard, an unaddressed query reads that cluster and killed our training jobs."""
    import os

    from harness.core.local_ray import STATE_API_NOWHERE, STATE_API_VARIABLE

    def ask() -> tuple[str | None, str]:
        from ray.util.state import get_actor
        from ray.util.state.exception import RayStateApiException

        try:
            get_actor("ff" * 16, timeout=2)
        except RayStateApiException:
            return os.environ.get(STATE_API_VARIABLE), "refused"
        return os.environ.get(STATE_API_VARIABLE), "answered"

    assert ray_local.get(ray_local.remote(ask).remote()) == (STATE_API_NOWHERE, "refused")
    assert os.environ.get(STATE_API_VARIABLE) != STATE_API_NOWHERE  # the driver's own environment is untouched


def test_two_cell_sweep_through_ray(tmp_path, tiny_zoo, ray_local, capsys):
    path = write_sweep(tmp_path / "sweep.yaml")
    results = tmp_path / "results"
    code = main(["run", str(path), "--results-dir", str(results), "--run-name", "r1"])
    captured = capsys.readouterr()
    out = captured.out
    run_dir = results / "tiny" / "r1"
    assert code == 0, out
    assert f"report: {run_dir / 'report.md'}" in out
    assert "speculative" in out.split("report:")[0]  # the best rows, printed as a table
    assert "[3/3]" in captured.err and "ok 3, failed 0" in captured.err  # the sweep's own lines on the terminal
    assert (run_dir / "sweep.log").exists() and json.loads((run_dir / "env.json").read_text())["command"]
    records = list(ResultStore(run_dir).records())
    assert {r.status for r in records} == {"ok"}
    baselines = [r for r in records if r.kind == "baseline"]
    records = [r for r in records if r.kind == "strategy"]
    assert len(baselines) == 1 and len(records) == 2
    assert sorted(r.cell["params"]["gamma"] for r in records) == [2, 3]
    for record in records:
        assert record.paired_with["cell_id"] == baselines[0].cell_id
        assert len(record.prompts) == 3
        for prompt in record.prompts:
            turn = prompt.turns[0]
            assert turn.tokens_match is True
            assert turn.strategy.tokens == turn.baseline.tokens
    report = (run_dir / "report.md").read_text()
    assert "Speedup by strategy and prompt set" in report and "speculative" in report
    assert (run_dir / "cells.csv").exists() and (run_dir / "speedup.png").stat().st_size > 0

    # Re-running into the same run directory skips every finished cell.
    code = main(["run", str(path), "--results-dir", str(results), "--run-name", "r1"])
    assert code == 0
    assert len(list(ResultStore(run_dir).records())) == 3


def test_run_compile_on_cpu_workers_says_so_once_and_decodes_the_baselines_tokens(tmp_path, tiny_zoo, ray_local,
                                                                                   capsys):
    run = {"max_new_tokens": 12, "warmup_prompts": 1, "workers": 1, "num_cpus": 2, "pairing": "interleaved",
           "compile": True}
    path = write_sweep(tmp_path / "sweep.yaml", run=run,
                       strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 3}}])
    results = tmp_path / "results"
    code = main(["run", str(path), "--results-dir", str(results), "--run-name", "r1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("run.compile: the workers have no GPU") == 1
    (record,) = ResultStore(results / "tiny" / "r1").records()
    assert record.ok and record.cell["generation"]["compile"] is True
    assert all(turn.strategy.tokens == turn.baseline.tokens for prompt in record.prompts for turn in prompt.turns)


def test_failing_strategy_is_recorded_and_sweep_goes_on(tmp_path, tiny_zoo, ray_local, capsys):
    """A cell whose draft cannot load is recorded failed with its error; the other cell succeeds; exit code 1.

    The broken draft has the target's tokenizer (so the check before Ray passes) but no weights.
    """
    from harness.core.models import ModelSpec, pretrained_location

    broken = tmp_path / "broken-draft"
    broken.mkdir()
    for source in Path(pretrained_location(ModelSpec("zoo:draft-1l"), tiny_zoo)).iterdir():
        if source.name.startswith(("tokenizer", "special_tokens")):
            (broken / source.name).write_bytes(source.read_bytes())
    path = write_sweep(
        tmp_path / "sweep.yaml",
        models={"target": "zoo:target", "drafts": {"small": "zoo:draft-1l", "broken": str(broken)}, "device": "cpu"},
        strategies=[{"name": "speculative", "params": {"gamma": 2}, "grid": {"draft": ["small", "broken"]}}],
    )
    code = main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run-name", "r"])
    assert code == 1
    records = {r.cell["params"]["draft"]: r for r in ResultStore(tmp_path / "results" / "tiny" / "r").records()
               if r.kind == "strategy"}
    assert records["small"].ok
    assert records["broken"].status == "failed" and records["broken"].error
    assert "1 failed" in capsys.readouterr().out


def stub_record(cell_id: str) -> CellRecord:
    return CellRecord(cell_id=cell_id, kind="strategy", label=cell_id, cell={"strategy": "s"}, status="ok")


def test_torn_last_line_is_tolerated_and_counted(tmp_path):
    store = ResultStore(tmp_path)
    store.append(stub_record("a"))
    with open(store.path, "a") as handle:
        handle.write('{"cell_id": "b", "sta')  # a crash mid-write
    assert [r.cell_id for r in store.records()] == ["a"]
    assert [line.number for line in store.unreadable] == [2]
    store.append(stub_record("c"))
    assert [r.cell_id for r in store.records()] == ["a", "c"]
    assert all(json.loads(line) for line in store.path.read_text().splitlines() if line.startswith('{"cell_id":"'))


def test_a_record_reads_back_as_the_same_type_and_a_newer_schema_is_refused(tmp_path):
    record = CellRecord(cell_id="x", kind="strategy", label="x", cell={"strategy": "s"}, status="ok",
                        env=Environment(device="cpu", parameters={"target": 5}),
                        prompts=[PromptRecord("p", "code", [TurnRecord(baseline=SideRecord(tokens=[1, 2]),
                                                                       strategy=SideRecord(tokens=[1, 2], drafted=2, accepted=1),
                                                                       tokens_match=True)])])
    store = ResultStore(tmp_path)
    store.append(record)
    (read,) = store.records()
    assert read == record and isinstance(read.prompts[0].turns[0].strategy, SideRecord)
    stored = json.loads(store.path.read_text())
    assert stored["schema"] == SCHEMA_VERSION
    with pytest.raises(RecordError, match="newer than this specsweep reads"):
        CellRecord.from_json({**stored, "schema": SCHEMA_VERSION + 1})
    with pytest.raises(RecordError, match=r"record.prompts\[0\].turns\[0\].baseline.wall_s: expected a number"):
        CellRecord.from_json({**stored, "prompts": [{"prompt_id": "p", "category": None,
                                                     "turns": [{"baseline": {"wall_s": "slow"}}]}]})
    del stored["schema"]  # written before the field existed: the same shape
    assert CellRecord.from_json(stored) == record
    old_side = {**stored["prompts"][0]["turns"][0]["strategy"], "tau": 1.0, "alpha": 0.5}  # stored up to schema 3
    old = {**stored, "schema": 3, "prompts": [{**stored["prompts"][0], "turns": [
        {**stored["prompts"][0]["turns"][0], "strategy": old_side}]}]}
    assert CellRecord.from_json(old) == record


SPEC_BENCH_ROWS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short note about rivers.", "Now make it rhyme."]},
    {"question_id": 201, "category": "translation", "turns": ["Translate to French: good morning."]},
    {"question_id": 301, "category": "qa", "turns": ["What is the capital of Peru?"]},
    {"question_id": 401, "category": "math_reasoning", "turns": ["Tom has 3 apples and buys 4 more. How many?"]},
]


def test_spec_bench_sweep_runs_turn_by_turn_and_reports_its_columns(tmp_path, tiny_zoo, ray_local):
    data = tmp_path / "question.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in SPEC_BENCH_ROWS) + "\n")
    path = write_sweep(tmp_path / "sweep.yaml", prompts=[{"name": "spec_bench", "source": str(data)}],
                       strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 2}}])
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run-name", "r"]) == 0
    run_dir = tmp_path / "results" / "tiny" / "r"
    strategy = next(r for r in ResultStore(run_dir).records() if r.kind == "strategy")
    turns = {p.prompt_id: len(p.turns) for p in strategy.prompts}
    assert turns == {"81": 2, "201": 1, "301": 1, "401": 1}
    writing = next(p for p in strategy.prompts if p.prompt_id == "81")
    assert writing.turns[1].prompt_tokens > writing.turns[0].prompt_tokens  # turn 2 sees turn 1's answer
    report = (run_dir / "report.md").read_text()
    header = next(line for line in report.splitlines() if "Multi-turn conversation" in line)
    for column in ("Translation", "Summarization", "QA", "Math reasoning", "RAG", "Mean accepted tokens", "Overall"):
        assert column in header


def test_runtime_env_reaches_the_strategys_workers(tmp_path, tiny_zoo, ray_local):
    path = write_sweep(
        tmp_path / "sweep.yaml", plugins=[str(TESTS / "plugins" / "probes.py")],
        strategies=[{"name": "env_probe", "runtime_env": {"env_vars": {"SPECSWEEP_PROBE": "from-runtime-env"}}},
                    {"name": "env_probe", "params": {"variable": "SPECSWEEP_PROBE_UNSET"}}])
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run-name", "r"]) == 0
    seen = {r.cell["params"].get("variable", "SPECSWEEP_PROBE"): r.prompts[0].turns[0].strategy.extras["env"]
            for r in ResultStore(tmp_path / "results" / "tiny" / "r").records() if r.kind == "strategy"}
    assert seen == {"SPECSWEEP_PROBE": "from-runtime-env", "SPECSWEEP_PROBE_UNSET": None}


def test_cascade_sweep_reports_best_k_matrix_and_heatmap(tmp_path, tiny_zoo, ray_local):
    path = write_sweep(
        tmp_path / "sweep.yaml",
        strategies=[{"name": "cascade", "params": {"drafts": ["small"], "use_mag": True},
                     "grid": {"k_matrix": [[[1, 2], [0, 5]], [[2, 2], [0, 5]]]}},
                    {"name": "speculative", "params": {"draft": "small", "gamma": 2}}])
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run-name", "r"]) == 0
    run_dir = tmp_path / "results" / "tiny" / "r"
    report = (run_dir / "report.md").read_text()
    assert "## CS Drafting" in report and "best k-matrix by cost speedup" in report
    assert "best single-draft speculative by cost speedup" in report
    assert (run_dir / "kmatrix_heatmap_0.png").stat().st_size > 0
