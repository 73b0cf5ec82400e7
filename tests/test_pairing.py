"""Pairing and the drift guard, run in-process on the tiny zoo.

A slowdown stretches everything to ``factor`` times its duration while a
switch is on, like a machine under load: a strategy's whole ``generate`` (by
sleeping inside it) and the target's forwards outside it (the drift guard's
probes, by forward hooks). Which runs see it is decided by wrapping the
strategies the runner builds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import harness.runner as runner
from harness.config import load_sweep
from harness.model_cache import ModelCache
from harness.runner import run_cell
from tests.conftest import write_sweep


class Load:
    """A multiplicative slowdown while ``on``: of whole ``generate`` calls, and of forwards outside them."""

    def __init__(self, factor: float) -> None:
        self.factor, self.on, self.started, self.generating = factor, False, 0.0, False

    def stretch(self, started: float) -> None:
        if self.on:  # spin rather than sleep: a sleeping process comes back to cold caches, a loaded one does not
            until = time.perf_counter() + (self.factor - 1) * (time.perf_counter() - started)
            while time.perf_counter() < until:
                pass

    def attach(self, module):
        def before(*_):
            self.started = time.perf_counter()

        def after(*_):
            if not self.generating:
                self.stretch(self.started)

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def wrap_builds(monkeypatch, load, decide):
    """Make ``runner.build`` return strategies whose ``generate`` first sets the load by ``decide(side, ids)``
    and then runs under it."""
    real_build = runner.build

    def build(name, params, models):
        strategy = real_build(name, params, models)
        side = "baseline" if name == "autoregressive" else "strategy"
        generate = strategy.generate

        def generate_with_load(ids, max_new_tokens, sampling):
            decide(side, ids)
            started, load.generating = time.perf_counter(), True
            try:
                return generate(ids, max_new_tokens, sampling)
            finally:
                load.generating = False
                load.stretch(started)

        strategy.generate = generate_with_load
        return strategy

    monkeypatch.setattr(runner, "build", build)


@pytest.fixture(scope="module")
def cache(tiny_zoo):
    return ModelCache(tiny_zoo, "cpu")


def cells(tmp_path: Path, pairing: str, tolerance: float = 0.10, repeats: int = 1, count: int = 6, tokens: int = 24):
    path = write_sweep(tmp_path / f"{pairing}.yaml",
                       prompts=[{"name": "code", "source": "zoo:code", "count": count}],
                       strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 3}}],
                       run={"max_new_tokens": tokens, "warmup_prompts": 1, "workers": 1, "num_cpus": 2,
                            "pairing": pairing, "drift_tolerance": tolerance, "repeats": repeats})
    return load_sweep(path).cells()


def test_the_drift_guard_flags_a_slowed_strategy_side_and_not_an_unslowed_cell(tmp_path, cache, monkeypatch):
    # 1-token forwards of the tiny zoo take about a millisecond, and a probe's median of 5 moved by +53 % once on a
    # busy 2-core machine, so the tolerance leaves room for that; the injected slowdown (3x on one side, about
    # +200 %) is far outside it.
    (cell,) = cells(tmp_path, "interleaved", tolerance=0.6)
    quiet = run_cell(cell, cache)
    assert quiet.ok and not quiet.timing["timing_suspect"], quiet.timing
    load = Load(factor=3.0)
    hooks = load.attach(cache.model(cell.target_spec, "target").model)
    try:
        wrap_builds(monkeypatch, load, lambda side, ids: setattr(load, "on", side == "strategy"))
        slowed = run_cell(cell, cache)
    finally:
        for hook in hooks:
            hook.remove()
    assert slowed.ok and slowed.timing["timing_suspect"]
    assert "1-token step" in slowed.timing["timing_note"] and slowed.timing["step_drift"] > 0.5


def test_interleaving_absorbs_load_that_shared_pairing_flags(tmp_path, cache, monkeypatch):
    (cell,) = cells(tmp_path, "interleaved", repeats=5, count=8, tokens=32)
    undisturbed = run_cell(cell, cache)
    load = Load(factor=3.0)
    hooks = load.attach(cache.model(cell.target_spec, "target").model)
    try:  # load on every other prompt (by prompt length parity), whichever side runs
        wrap_builds(monkeypatch, load, lambda side, ids: setattr(load, "on", len(ids) % 2 == 1))
        disturbed = run_cell(cell, cache)
        baseline_cell, strategy_cell = cells(tmp_path, "shared")
        monkeypatch.undo()
        load.on = False
        baseline = run_cell(baseline_cell, cache)  # the shared baseline ran before the load came
        wrap_builds(monkeypatch, load, lambda side, ids: setattr(load, "on", True))
        shared = run_cell(strategy_cell, cache, baseline=baseline)
    finally:
        for hook in hooks:
            hook.remove()
    slowed_turns = sum(len(turn.prompt_ids) % 2 == 1 for prompt in disturbed.prompts for turn in prompt.turns)
    assert 0 < slowed_turns < sum(len(prompt.turns) for prompt in disturbed.prompts)
    # Two undisturbed runs of this tiny cell differ by up to about 12 % on a 2-core machine (measured), so the
    # bound here is 15 %; under shared pairing the same 3x load moves the speedup about threefold, and is flagged.
    ratio = runner_speedup(disturbed) / runner_speedup(undisturbed)
    assert abs(ratio - 1) < 0.15, (runner_speedup(disturbed), runner_speedup(undisturbed))
    assert shared.ok and shared.timing["timing_suspect"]
    assert runner_speedup(shared) < 0.6 * runner_speedup(undisturbed)


def runner_speedup(record) -> float:
    from harness.metrics import summarize

    return summarize(record.prompts)["speedup"]


def test_a_shared_baseline_from_another_device_model_is_rerun_in_the_cell(tmp_path, cache):
    baseline_cell, strategy_cell = cells(tmp_path, "shared")
    baseline = run_cell(baseline_cell, cache)
    baseline.env.device_name = "Some Other GPU"
    record = run_cell(strategy_cell, cache, baseline=baseline)
    assert record.ok and record.paired_with["inline"]
    assert "Some Other GPU" in record.paired_with["reason"]


def test_interleaved_cells_alternate_which_side_runs_first_and_need_no_baseline_cell(tmp_path, cache):
    (cell,) = cells(tmp_path, "interleaved")
    assert cell.baseline_id == ""
    record = run_cell(cell, cache)
    firsts = [turn.first for prompt in record.prompts for turn in prompt.turns]
    assert firsts[:4] == ["baseline", "strategy", "baseline", "strategy"]
    assert all(turn.tokens_match and turn.prompt_ids for prompt in record.prompts for turn in prompt.turns)
