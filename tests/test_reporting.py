"""What makes numbers trustworthy to a reader: throughput speedups under sampling, command-line overrides,
dry runs, reports that say what ran (per target, escaped, titled), and the leaderboard across runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness.core.errors import ConfigError
from harness.core.metrics import summarize
from harness.core.records import CellRecord, PromptRecord
from harness.core.results import ResultStore
from harness.driver.config import load_sweep
from harness.driver.model_cache import ModelCache
from harness.driver.runner import run_cell
from tests.conftest import write_sweep


def turn(base_tokens: int, base_s: float, strat_tokens: int, strat_s: float) -> dict:
    def trace(tokens, seconds):
        return {"wall_s": seconds, "new_tokens": tokens, "steps": tokens, "drafted": 0, "accepted": 0,
                "cost_units": tokens, "target_calls": tokens, "forward": {}, "extras": {}}
    return {"baseline": trace(base_tokens, base_s), "strategy": trace(strat_tokens, strat_s), "tokens_match": False}


def prompt(turns: list[dict]) -> PromptRecord:
    return PromptRecord.from_json({"prompt_id": "p", "category": None, "turns": turns})


def test_a_sampled_run_with_unequal_token_counts_gets_the_per_token_speedup():
    prompts = [prompt([turn(10, 1.0, 20, 1.0)]), prompt([turn(30, 3.0, 15, 1.0)])]
    summary = summarize(prompts, sampled=True)
    # throughput: strategy 35 tokens / 2 s against baseline 40 tokens / 4 s; the wall-time ratio would say 2.0
    assert summary["speedup"] == pytest.approx((35 / 2) / (40 / 4))
    assert summary["match_rate"] is None
    greedy = [prompt([turn(10, 2.0, 10, 1.0)])]
    assert summarize(greedy)["speedup"] == pytest.approx(2.0)  # equal tokens: the ratio of wall times


def test_set_overrides_and_limit_reach_the_expanded_cells(tmp_path, tiny_zoo):
    path = write_sweep(tmp_path / "sweep.yaml")
    sweep = load_sweep(path, ["run.max_new_tokens=5", "prompts[0].count=2", "strategies[0].grid.gamma=[4]",
                              "run.pairing=interleaved"], limit=1)
    cells = sweep.cells()
    assert [cell.params["gamma"] for cell in cells] == [4]
    assert cells[0].run.max_new_tokens == 5 and cells[0].prompt_set.count == 1 and cells[0].kind == "strategy"
    with pytest.raises(ConfigError, match=r"--set.*prompts\[3\] does not exist"):
        load_sweep(path, ["prompts[3].count=2"])
    with pytest.raises(ConfigError, match=r"run\.pairing.*use one of interleaved, shared"):
        load_sweep(path, ["run.pairing=sometimes"])


def test_dry_run_prints_the_cells_and_starts_no_ray(tmp_path, tiny_zoo, capsys):
    import ray

    from harness.driver.cli import main

    path = write_sweep(tmp_path / "sweep.yaml")
    assert main(["run", str(path), "--dry-run", "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "3 cells (1 baseline, 2 strategy)" in out and "artefacts to train: none" in out
    assert not ray.is_initialized() and not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def cache(tiny_zoo):
    return ModelCache(tiny_zoo, "cpu")


def run_into(run_dir: Path, sweep_path: Path, cache: ModelCache, device_name: str | None = None) -> Path:
    """Run every cell of a sweep in-process into ``run_dir`` (shared baselines first), as the driver would."""
    sweep = load_sweep(sweep_path)
    store, baselines = ResultStore(run_dir), {}
    for cell in sweep.cells():
        record = run_cell(cell, cache, baseline=baselines.get(cell.baseline_id))
        if device_name:
            record.env.device_name = device_name
        if cell.kind == "baseline":
            baselines[cell.cell_id] = record
        store.append(record)
    (run_dir / "sweep.yaml").write_text(sweep_path.read_text())
    return run_dir


def test_a_two_target_report_has_per_target_rows_and_no_average_across_targets(tmp_path, cache):
    from harness.driver.report import write_report

    path = write_sweep(tmp_path / "two.yaml", name="two-targets",
                       models={"targets": {"big": "zoo:target", "mid": "zoo:draft-2l"},
                               "drafts": {"small": "zoo:draft-1l"}, "device": "cpu"},
                       prompts=[{"name": "code", "source": "zoo:code", "count": 2}],
                       strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 2}}])
    run_dir = run_into(tmp_path / "run", path, cache)
    report = write_report(run_dir).read_text()
    assert report.startswith("# specsweep report: two-targets / run")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(row["target"] for row in summary) == ["big", "mid"]
    best = report.split("## Best configuration per strategy")[1].split("##")[0]
    assert "| big | speculative |" in best and "| mid | speculative |" in best
    assert "fewer than 8 prompts" in report and "## Glossary" in report


def test_report_escapes_table_cells_and_counts_no_match_when_every_cell_failed(tmp_path):
    from harness.driver.report import write_report

    cell = {"target": ["t", {"id": "zoo:target"}], "strategy": "speculative", "params": {"draft": "a|b"},
            "prompt_set": {"name": "p", "source": "zoo:code"}, "shard": 0,
            "generation": {"max_new_tokens": 4, "temperature": 0.0, "seed": 0}}
    ResultStore(tmp_path).append(CellRecord(cell_id="c1", kind="strategy", label="c1", status="failed", cell=cell,
                                            error="line one\nline | two"))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "escaped"}))
    report = write_report(tmp_path).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| c1 "))
    assert "line one line \\| two" in row and row.count(" | ") == 6  # seven columns, none split
    correctness = report.split("## Correctness")[1].split("\n\n")[1]
    assert "| speculative | lossless | 1 | 1 | - |" in correctness


def test_compare_lists_each_run_and_marks_rows_from_other_devices(tmp_path, cache):
    from harness.driver.compare import leaderboard, write_leaderboard

    path = write_sweep(tmp_path / "sweep.yaml", prompts=[{"name": "code", "source": "zoo:code", "count": 2}])
    first = run_into(tmp_path / "runs" / "a", path, cache, device_name="GPU model A")
    second = run_into(tmp_path / "runs" / "b", path, cache, device_name="GPU model B")
    table = leaderboard([first, second])
    assert sorted(table["run"]) == ["runs/a", "runs/a", "runs/b", "runs/b"]
    assert set(table["device"]) == {"GPU model A †", "GPU model B †"}
    assert {"code", "τ", "overall"} <= set(table.columns) and "Multi-turn conversation" not in table.columns
    same = leaderboard([first])
    assert not same["device"].str.endswith("†").any()
    markdown, csv = write_leaderboard([first, second], tmp_path / "out", by="target")
    assert "different device models" in markdown.read_text() and csv.exists()


def test_env_json_names_the_build_machine_and_libraries_and_copies_the_inputs(tmp_path, monkeypatch):
    from harness.driver.provenance import build_info, write_environment

    monkeypatch.chdir(tmp_path)  # the commit comes from the package's checkout, not the current directory
    config = tmp_path / "train.yaml"
    config.write_text("kind: eagle\n")
    env = json.loads(write_environment(tmp_path / "run", ["run", "sweep.yaml"], [config]).read_text())
    assert env["specsweep"] == build_info() and env["specsweep"]["commit"] != "unknown"
    assert env["command"][1:] == ["run", "sweep.yaml"] and env["cpu"]
    assert set(env["libraries"]) >= {"torch", "transformers", "peft", "ray", "deepspeed", "datasets", "numpy"}
    assert (tmp_path / "run" / "inputs" / "train.yaml").read_text() == "kind: eagle\n"


def test_compare_names_each_rows_dtype_and_marks_a_mix_of_dtypes(tmp_path, cache):
    from harness.driver.compare import leaderboard, write_leaderboard

    prompts = [{"name": "code", "source": "zoo:code", "count": 2}]
    models = {"target": "zoo:target", "drafts": {"small": "zoo:draft-1l"}, "device": "cpu"}
    fp32 = run_into(tmp_path / "runs" / "fp32", write_sweep(tmp_path / "a.yaml", prompts=prompts), cache)
    bf16 = run_into(tmp_path / "runs" / "bf16", write_sweep(tmp_path / "b.yaml", prompts=prompts,
                                                            models={**models, "dtype": "bfloat16"}), cache)
    table = leaderboard([fp32, bf16])
    assert dict(zip(table["run"], table["dtype"])) == {"runs/fp32": "float32 ‡", "runs/bf16": "bfloat16 ‡"}
    assert set(leaderboard([bf16])["dtype"]) == {"bfloat16"}  # one dtype: named, not marked
    for by in ("target", "strategy"):
        assert "dtype" in leaderboard([fp32, bf16], by=by).columns
    markdown, _ = write_leaderboard([fp32, bf16], tmp_path / "out")
    assert "different dtypes" in markdown.read_text()


def test_cells_run_with_a_retrained_artefact_are_reported_apart_from_the_earlier_ones():
    from harness.driver.report import group_rows

    def record(cell_id: str, head_key: str, seconds: float) -> CellRecord:
        cell = {"target": ["t", {"id": "zoo:target"}], "strategy": "eagle", "params": {"head": "head", "gamma": 3},
                "prompt_set": {"name": "p", "source": "zoo:code"}, "shard": 0, "artifacts": {"head": head_key},
                "generation": {"max_new_tokens": 4, "temperature": 0.0, "seed": 0}}
        return CellRecord(cell_id=cell_id, kind="strategy", label=cell_id, status="ok", cell=cell,
                          prompts=[prompt([turn(10, 2.0, 10, seconds)])])

    rows = group_rows({"old": record("old", "aaaaaaaa11", 2.0), "new": record("new", "bbbbbbbb22", 1.0)})
    assert len(rows) == 2
    by_key = {("aaaaaaaa" in params, "bbbbbbbb" in params): speedup for params, speedup in zip(rows.params, rows.speedup)}
    assert by_key == {(True, False): pytest.approx(1.0), (False, True): pytest.approx(2.0)}


def test_compare_sets_the_runs_ranking_beside_each_published_one():
    import pandas as pd

    from harness.driver.compare import beside_published

    def row(strategy, params, overall, tau):
        return {"run": "r/1", "device": "cpu", "dtype": "float32", "target": "zoo:target", "strategy": strategy,
                "params": params, "τ": tau, "overall": overall, "suspect": False}

    frame = pd.DataFrame([row("speculative", "gamma=2", 1.1, 1.8), row("speculative", "gamma=4", 2.0, 2.9),
                          row("prompt_lookup", "-", 1.5, 2.2), row("lookahead", "-", 1.2, 2.5),
                          row("cascade", "-", 3.0, 3.0)])  # in no published table
    table = beside_published(frame)
    seven = table[table["published"] == "spec-bench-a100-vicuna-7b"].set_index("method")
    assert list(seven.index) == ["PLD", "SpS", "Lookahead"]  # published order, among the methods the run has
    assert list(seven["published rank"]) == [1, 2, 3] and list(seven["rank"]) == [2, 1, 3]
    assert list(seven["moved"]) == [-1, 1, 0]
    assert seven.loc["SpS", "speedup"] == 2.0 and seven.loc["SpS", "specsweep"] == "speculative gamma=4"  # its best
    assert "cascade" not in " ".join(table["specsweep"])


def test_the_shipped_published_rankings_are_ordered_by_speedup():
    from harness.core.published import published_rankings
    from strategies.registry import available

    entries = published_rankings()
    tables = {entry.table for entry in entries}
    assert {"spec-bench-a100-vicuna-7b", "spec-bench-a100-vicuna-13b", "eagle3-paper-vicuna-13b"} <= tables
    for table in tables:
        rows = [entry for entry in entries if entry.table == table]
        assert [entry.rank for entry in rows] == list(range(1, len(rows) + 1))
        assert [entry.speedup for entry in rows] == sorted((entry.speedup for entry in rows), reverse=True)
    known = set(available()) | {"eagle3"}  # EAGLE-3 is published and not yet a specsweep method
    assert {entry.strategy for entry in entries if entry.strategy} <= known
