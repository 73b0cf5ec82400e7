"""Pairing and the drift guard, run in-process on the tiny zoo, on a virtual clock.

Every duration the runner measures is read from the model cache's clock. Here
that clock is virtual: it moves only when a model runs a forward, by a fixed
cost per forward (the target's 1, a draft's 0.2) times a load factor. A load
is the factor raised while a switch is on; which runs see it is decided by
wrapping the strategies the runner builds. So the timings, and every verdict
drawn from them, are the same on a quiet machine and a busy one. The same
demonstration on the wall clock, with real load, is ``bench/drift_demo.sh``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import harness.driver.runner as runner
from harness.core.metrics import summarize
from harness.driver.config import load_sweep
from harness.driver.model_cache import ModelCache
from harness.driver.runner import run_cell
from tests.conftest import write_sweep

TARGET_COST, DRAFT_COST = 1.0, 0.2  # virtual seconds per forward


class VirtualClock:
    """Virtual seconds that advance by each hooked model's cost per forward, times ``factor`` while ``on``."""

    def __init__(self, factor: float) -> None:
        self.now, self.factor, self.on = 0.0, factor, False

    def __call__(self) -> float:
        return self.now

    def charge(self, model, cost: float):
        """Advance the clock by ``cost`` (times the load) at the end of every forward of ``model``'s decoder."""
        def after(*_):
            self.now += cost * (self.factor if self.on else 1.0)

        return model.model.get_decoder().register_forward_hook(after)


def wrap_builds(monkeypatch, clock, decide):
    """Make ``runner.build`` return strategies whose ``generate`` first switches the load by ``decide(side, ids)``."""
    real_build = runner.build

    def build(name, params, models):
        strategy = real_build(name, params, models)
        side = "baseline" if name == "autoregressive" else "strategy"
        generate = strategy.generate

        def generate_with_load(ids, max_new_tokens, sampling):
            decide(side, ids)
            return generate(ids, max_new_tokens, sampling)

        strategy.generate = generate_with_load
        return strategy

    monkeypatch.setattr(runner, "build", build)


@pytest.fixture(scope="module")
def cache(tiny_zoo):
    return ModelCache(tiny_zoo, "cpu")


@pytest.fixture()
def virtual(tiny_zoo):
    """A model cache on a virtual clock (a load factor of 3), its target and drafts charged per forward."""
    clock = VirtualClock(factor=3.0)
    cache = ModelCache(tiny_zoo, "cpu", clock=clock)
    hooks = []

    def charged(cell):
        target = cache.model(cell.target_spec, "target")
        if not hooks:
            hooks.append(clock.charge(target, TARGET_COST))
            for name, spec in cell.drafts.items():
                hooks.append(clock.charge(cache.model(spec, f"draft:{name}"), DRAFT_COST))
        return cell

    yield clock, cache, charged
    for hook in hooks:
        hook.remove()


def cells(tmp_path: Path, pairing: str, repeats: int = 1, count: int = 6, tokens: int = 24):
    path = write_sweep(tmp_path / f"{pairing}.yaml",
                       prompts=[{"name": "code", "source": "zoo:code", "count": count}],
                       strategies=[{"name": "speculative", "params": {"draft": "small", "gamma": 3}}],
                       run={"max_new_tokens": tokens, "warmup_prompts": 1, "workers": 1, "num_cpus": 2,
                            "pairing": pairing, "repeats": repeats,
                            "max_cpu_wait": 0.99})  # the real machine's load is not what these tests time
    return load_sweep(path).cells()


def test_the_drift_guard_flags_a_slowed_strategy_side_and_not_an_unslowed_cell(tmp_path, virtual, monkeypatch):
    clock, cache, charged = virtual
    (cell,) = cells(tmp_path, "interleaved")
    quiet = run_cell(charged(cell), cache)
    assert quiet.ok and not quiet.timing["timing_suspect"], quiet.timing
    wrap_builds(monkeypatch, clock, lambda side, ids: setattr(clock, "on", side == "strategy"))
    slowed = run_cell(cell, cache)
    assert slowed.ok and slowed.timing["timing_suspect"]
    assert "1-token step" in slowed.timing["timing_note"] and slowed.timing["step_drift"] == pytest.approx(2.0)


def test_interleaving_absorbs_load_that_shared_pairing_flags(tmp_path, virtual, monkeypatch):
    clock, cache, charged = virtual
    (cell,) = cells(tmp_path, "interleaved", repeats=3, count=8, tokens=32)
    undisturbed = run_cell(charged(cell), cache)
    # load on every other prompt (by prompt length parity), whichever side runs
    wrap_builds(monkeypatch, clock, lambda side, ids: setattr(clock, "on", len(ids) % 2 == 1))
    disturbed = run_cell(cell, cache)
    baseline_cell, strategy_cell = cells(tmp_path, "shared")
    monkeypatch.undo()
    clock.on = False
    baseline = run_cell(baseline_cell, cache)  # the shared baseline ran before the load came
    wrap_builds(monkeypatch, clock, lambda side, ids: setattr(clock, "on", True))
    shared = run_cell(strategy_cell, cache, baseline=baseline)
    slowed_turns = sum(len(turn.prompt_ids) % 2 == 1 for prompt in disturbed.prompts for turn in prompt.turns)
    assert 0 < slowed_turns < sum(len(prompt.turns) for prompt in disturbed.prompts)
    assert not undisturbed.timing["timing_suspect"] and not disturbed.timing["timing_suspect"]
    # Interleaved, a prompt's load falls on both of its sides: the pooled speedup moves only by the prompts' new
    # weights (a few per cent). Shared, the strategy alone ran under a 3x load: the speedup falls about threefold.
    ratio = speedup(disturbed) / speedup(undisturbed)
    assert abs(ratio - 1) < 0.15, (speedup(disturbed), speedup(undisturbed))
    assert shared.ok and shared.timing["timing_suspect"]
    assert speedup(shared) == pytest.approx(speedup(undisturbed) / 3, rel=0.15)


def speedup(record) -> float:
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
