"""Sweep files: validation errors are one line naming the field, exit code 2; grids expand to stable cells."""

from __future__ import annotations

import pytest

from harness.driver.cli import main
from harness.driver.config import load_sweep
from tests.conftest import TINY_ZOO, write_sweep

SPEC_BENCH_LINE = '{"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now another."]}\n'

SMALL = {"small": "zoo:draft-1l"}  # the draft the default strategy names
BAD_CASES = {
    "unknown top-level key": ({"modles": {}}, "modles: unknown key"),
    "unknown strategy": ({"strategies": [{"name": "telepathy"}]}, "strategies[0].name: unknown strategy 'telepathy'"),
    "wrong type": ({"strategies": [{"name": "speculative", "params": {"draft": "small", "gamma": "four"}}]},
                   "strategies[0].gamma: expected an integer"),
    "bad value": ({"strategies": [{"name": "speculative", "params": {"draft": "small", "gamma": 0}}]},
                  "strategies[0].gamma: must be >= 1"),
    "unknown param": ({"strategies": [{"name": "speculative", "params": {"draft": "small", "gama": 2}}]},
                      "strategies[0].gama: unknown parameter"),
    "draft not defined": ({"strategies": [{"name": "speculative", "params": {"draft": "huge"}}]},
                          "strategies[0].draft: draft 'huge' is not in models.drafts"),
    "grid value not a list": ({"strategies": [{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": 4}}]},
                              "strategies[0].grid.gamma: expected a non-empty list"),
    "missing models": ({"models": None}, "models: missing"),
    "unknown zoo model": ({"models": {"target": "zoo:giant", "drafts": SMALL}}, "models.targets.target.id: the zoo has no model 'giant'"),
    "missing local model": ({"models": {"target": "./no/such/model", "drafts": SMALL}}, "models.targets.target.id: local model path"),
    "bad dtype": ({"models": {"target": "zoo:target", "dtype": "float8", "drafts": SMALL}}, "models.dtype: unknown dtype 'float8'"),
    "missing prompt file": ({"prompts": [{"name": "sb", "source": "missing.jsonl"}]}, "prompts[0].source: prompt file"),
    "unknown zoo prompts": ({"prompts": [{"name": "x", "source": "zoo:poetry"}]}, "prompts[0].source: unknown zoo prompt set"),
    "negative temperature": ({"run": {"temperature": -1}}, "run.temperature: must be >= 0"),
    "run type": ({"run": {"max_new_tokens": "many"}}, "run.max_new_tokens: expected an integer"),
    "unknown run key": ({"run": {"gpus": 2}}, "run.gpus: unknown key"),
    "bad zoo key": ({"zoo": {**TINY_ZOO, "layers": 3}}, "zoo.layers: unknown key"),
    "bad name": ({"name": "my sweep!"}, "name: expected a sweep name"),
    "peer at batch size 4": ({"strategies": [{"name": "hf_greedy"}], "run": {"batch_size": 4, "pairing": "interleaved"}},
                             "run.batch_size: hf_greedy decodes one prompt at a time; it cannot decode at batch size 4"),
    "grid batch size 0": ({"strategies": [{"name": "speculative", "params": {"draft": "small"},
                                           "grid": {"batch_size": [1, 0]}}]},
                          "strategies[0].batch_size: must be >= 1, got 0"),
    "batch under shared pairing": ({"run": {"batch_size": 2, "pairing": "shared"}},
                                   "run.pairing: batch size 2 needs interleaved pairing"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sweep_gives_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
    overrides, expected = BAD_CASES[case]
    import transformers

    import harness.driver.scheduler

    def too_early(*args, **kwargs):
        raise AssertionError("the sweep started (Ray, workers, models) before validation finished")

    # Models load in Ray workers, so the guard sits where a sweep starts, and on any model load in this process.
    monkeypatch.setattr(harness.driver.scheduler, "run_sweep", too_early)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", too_early)
    path = write_sweep(tmp_path / "sweep.yaml", **overrides)
    code = main(["run", str(path), "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not list((tmp_path / "results").rglob("cells.jsonl"))


def test_missing_sweep_file_and_invalid_yaml(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "sweep file:" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert main(["run", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_grid_expansion_and_stable_ids(tmp_path):
    path = write_sweep(tmp_path / "sweep.yaml",
                       prompts=[{"name": "code", "source": "zoo:code", "count": 4, "shards": 2}],
                       strategies=[{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": [2, 3, 4]}},
                                   {"name": "autoregressive"}])
    cells = load_sweep(path).cells()
    baselines = {cell.cell_id: cell for cell in cells if cell.kind == "baseline"}
    assert len(baselines) == 2 and len(cells) == 2 * (1 + 3 + 1)  # one baseline per shard, shared by its strategies
    for cell in cells:
        if cell.kind == "strategy":
            assert baselines[cell.baseline_id].shard == cell.shard
    assert len({cell.cell_id for cell in cells}) == len(cells)
    assert [cell.cell_id for cell in load_sweep(path).cells()] == [cell.cell_id for cell in cells]
    assert {c.cell_id for c in load_sweep(path).cells("cuda")}.isdisjoint(c.cell_id for c in cells)  # device type pairs
    gammas = sorted(cell.params["gamma"] for cell in cells if cell.strategy == "speculative")
    assert gammas == [2, 2, 3, 3, 4, 4]
    # changing a generation setting changes every id
    changed = write_sweep(tmp_path / "changed.yaml", run={"max_new_tokens": 13},
                          prompts=[{"name": "code", "source": "zoo:code", "count": 4, "shards": 2}],
                          strategies=[{"name": "autoregressive"}])
    assert not {c.cell_id for c in load_sweep(changed).cells()} & {c.cell_id for c in cells}


def test_spec_bench_prompts_load_and_shard(tmp_path):
    from harness.core.prompts import load_prompts, shard

    data = tmp_path / "question.jsonl"
    data.write_text("".join(SPEC_BENCH_LINE.replace('"question_id": 1', f'"question_id": {i}')
                            .replace("writing", "math" if i % 2 else "writing") for i in range(6)))
    path = write_sweep(tmp_path / "sweep.yaml", prompts=[{"name": "sb", "source": str(data), "categories": ["math"]}])
    spec = load_sweep(path).prompt_sets[0]
    prompts = load_prompts(spec)
    assert [p.prompt_id for p in prompts] == ["1", "3", "5"]
    assert prompts[0].turns == ("Write a haiku.", "Now another.")
    assert [p.prompt_id for p in shard(prompts, 1, 2)] == ["3"]


def strategy_ids(path) -> list[str]:
    return [cell.cell_id for cell in load_sweep(path).cells() if cell.kind == "strategy"]


def test_defaulted_and_explicit_params_give_the_same_cell(tmp_path):
    implicit = write_sweep(tmp_path / "a.yaml", strategies=[{"name": "speculative", "params": {"draft": "small"}}])
    explicit = write_sweep(tmp_path / "b.yaml", strategies=[{"name": "speculative",
                                                             "params": {"draft": "small", "gamma": 4}}])
    other = write_sweep(tmp_path / "c.yaml", strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 3}}])
    assert strategy_ids(implicit) == strategy_ids(explicit) != strategy_ids(other)


def test_cell_ids_follow_the_prompt_file_the_zoo_and_the_plugins(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question_id": 1, "category": "qa", "turns": ["What is a cache?"]}\n')
    sets = [{"name": "mine", "source": str(prompts)}]
    first = strategy_ids(write_sweep(tmp_path / "a.yaml", prompts=sets))
    prompts.write_text('{"question_id": 1, "category": "qa", "turns": ["What is a KV cache?"]}\n')
    assert strategy_ids(write_sweep(tmp_path / "a.yaml", prompts=sets)) != first  # same path, new content

    base = strategy_ids(write_sweep(tmp_path / "z.yaml"))
    other_zoo = {**TINY_ZOO, "seed": 1}
    assert strategy_ids(write_sweep(tmp_path / "z.yaml", zoo=other_zoo)) != base

    plugin = tmp_path / "plugin.py"
    plugin.write_text("VALUE = 1\n")
    with_plugin = strategy_ids(write_sweep(tmp_path / "p.yaml", plugins=[str(plugin)]))
    assert with_plugin != base
    plugin.write_text("VALUE = 2\n")
    assert strategy_ids(write_sweep(tmp_path / "p.yaml", plugins=[str(plugin)])) != with_plugin


@pytest.mark.parametrize("overrides, message", [
    ({"modles": {}}, "modles: unknown key; did you mean 'models'?"),
    ({"strategies": [{"name": "speculative", "params": {"draft": "small", "gama": 3}}]},
     "strategies[0].gama: unknown parameter; did you mean 'gamma'?"),
    ({"run": {"max_new_token": 8}}, "run.max_new_token: unknown key; did you mean 'max_new_tokens'?"),
    ({"prompts": [{"name": "code", "source": "zoo:code", "cont": 2}]}, "prompts[0].cont: unknown key; did you mean 'count'?"),
])
def test_unknown_keys_suggest_the_closest_one(tmp_path, capsys, overrides, message):
    path = write_sweep(tmp_path / "sweep.yaml", **overrides)
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_every_problem_of_a_file_is_reported_at_once_one_line_each(tmp_path, capsys):
    """One run reports the errors of independent sections together, with "did you mean" for typos, and a check
    against a section that has its own error (a strategy naming a broken draft) is not reported twice."""
    path = write_sweep(
        tmp_path / "sweep.yaml", name="bad name!", modles={},
        models={"target": "zoo:target", "drafts": {"small": "zoo:draft-1l", "broken": "zoo:giant"}, "dtype": "f17"},
        run={"max_new_tokens": 0, "temprature": 0.5, "workers": "two"},
        train={"head": {"kind": "eagle", "stepz": 3, "lr": -1.0}},
        strategies=[{"name": "speculative", "params": {"draft": "small", "gama": 3}},
                    {"name": "speculativ"},
                    {"name": "speculative", "params": {"draft": "broken"}},
                    {"name": "eagle", "params": {"head": "head"}},
                    {"name": "prompt_lookup", "grid": {"num_tokens": [0, 0, 4]}}])
    code = main(["run", str(path), "--results-dir", str(tmp_path / "results")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    expected = ["modles: unknown key; did you mean 'models'?", "name: expected a sweep name",
                "models.dtype: unknown dtype 'f17'", "models.drafts.broken.id: the zoo has no model 'giant'",
                "train.head.stepz: unknown key; did you mean 'steps'?",
                "run.temprature: unknown key; did you mean 'temperature'?", "run.workers: expected an integer",
                "run.max_new_tokens: must be >= 1", "strategies[0].gama: unknown parameter; did you mean 'gamma'?",
                "strategies[1].name: unknown strategy 'speculativ'; did you mean 'speculative'?",
                "strategies[4].num_tokens: must be >= 1"]
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, lines)
    assert len(lines) == len(expected), lines  # nothing about strategies[2]'s or [3]'s references, no repeats
    assert all(line.startswith("specsweep: error: ") for line in lines)
