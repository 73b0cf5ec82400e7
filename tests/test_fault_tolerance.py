"""The distributed harness under failure: lost workers, a killed driver, raising strategies, lost nodes."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core.local_ray import NICENESS_CONFIG, start_local_ray
from harness.core.results import ResultStore
from harness.driver.config import load_sweep
from harness.driver.scheduler import run_sweep
from tests.conftest import TESTS, write_sweep

REPO = TESTS.parent


def cell_id_counts(run_dir: Path) -> collections.Counter:
    return collections.Counter(record.cell_id for record in ResultStore(run_dir).records())


def many_cells_sweep(path: Path, **overrides) -> Path:
    settings = dict(
        prompts=[{"name": "code", "source": "zoo:code", "count": 4, "shards": 2}],
        strategies=[{"name": "speculative", "params": {"draft": "small"}, "grid": {"gamma": [1, 2, 3]}}],
        run={"max_new_tokens": 10, "warmup_prompts": 1, "workers": 2, "num_cpus": 2, "pairing": "shared"},
    )
    settings.update(overrides)
    return write_sweep(path, **settings)


@pytest.fixture
def fresh_ray():
    import ray

    yield ray
    ray.shutdown()


def test_killed_worker_is_replaced_and_its_cell_rerun(tmp_path, tiny_zoo, fresh_ray):
    sweep = load_sweep(many_cells_sweep(tmp_path / "sweep.yaml"))
    start_local_ray(2, log_to_driver=False)
    killed: list[str] = []
    messages: list[str] = []

    def kill_a_busy_worker(dispatcher, record):
        busy = dispatcher.busy_workers()
        if not killed and busy:
            name = sorted(busy)[0]
            killed.append(busy[name].cell_id)
            fresh_ray.kill(dispatcher.slots[name].handle, no_restart=True)

    outcome = run_sweep(sweep, tmp_path / "run", log=messages.append, on_record=kill_a_busy_worker)
    counts = cell_id_counts(tmp_path / "run")
    expected = {cell.cell_id for cell in sweep.cells("cpu")}
    assert killed, "no worker was busy when the first result arrived"
    assert any("was lost" in message for message in messages)
    assert set(counts) == expected and set(counts.values()) == {1}
    assert outcome.failed == 0 and outcome.ok == len(expected)


def test_raising_strategy_fails_only_its_cell(tmp_path, tiny_zoo, zoo_models, fresh_ray):
    from harness.core.prompts import conversation_ids, load_prompts, shard

    _, tokenizer = zoo_models
    path = many_cells_sweep(tmp_path / "sweep.yaml", plugins=[str(TESTS / "plugins" / "probes.py")],
                            run={"max_new_tokens": 10, "warmup_prompts": 0, "workers": 2, "num_cpus": 2, "pairing": "shared"})
    sweep = load_sweep(path)
    prompts = load_prompts(sweep.prompt_sets[0], tiny_zoo.corpus)
    poisoned = shard(prompts, 1, 2)[-1]
    spec = sweep.prompt_sets[0]
    lengths = {len(conversation_ids(tokenizer, spec, [p.turns[0]], 10**6)) for p in prompts if p is not poisoned}
    poison_length = len(conversation_ids(tokenizer, spec, [poisoned.turns[0]], 10**6))
    assert poison_length not in lengths
    path = many_cells_sweep(tmp_path / "sweep.yaml", plugins=[str(TESTS / "plugins" / "probes.py")],
                            strategies=[{"name": "faulty", "params": {"poison_length": poison_length}},
                                        {"name": "speculative", "params": {"draft": "small", "gamma": 2}}],
                            run={"max_new_tokens": 10, "warmup_prompts": 0, "workers": 2, "num_cpus": 2, "pairing": "shared"})
    start_local_ray(2, log_to_driver=False)
    outcome = run_sweep(load_sweep(path), tmp_path / "run", log=lambda m: None)
    records = list(ResultStore(tmp_path / "run").records())
    failed = [r for r in records if not r.ok]
    assert len(records) == 2 * 3 and outcome.failed == 1
    assert len(failed) == 1 and failed[0].cell["strategy"] == "faulty" and failed[0].cell["shard"] == 1
    assert f"ValueError: poisoned prompt of {poison_length} tokens" in failed[0].error
    assert "Traceback" in failed[0].traceback


def test_worker_loads_its_target_once(tmp_path, tiny_zoo, fresh_ray):
    path = many_cells_sweep(tmp_path / "sweep.yaml", run={"max_new_tokens": 6, "warmup_prompts": 0, "workers": 1,
                                                                  "pairing": "shared"})
    start_local_ray(1, log_to_driver=False)
    run_sweep(load_sweep(path), tmp_path / "run", log=lambda m: None)
    records = list(ResultStore(tmp_path / "run").records())
    assert len(records) == 2 * (1 + 3) and {r.worker for r in records} == {"worker-1"}
    last = max(records, key=lambda r: r.started).model_loads
    assert last == {"zoo:target": 1, "zoo:draft-1l": 1}


def test_killed_driver_resumes_without_rerunning_cells(tmp_path, tiny_zoo, specsweep_home):
    path = many_cells_sweep(tmp_path / "sweep.yaml", run={"max_new_tokens": 24, "warmup_prompts": 1, "workers": 1,
                                                           "num_cpus": 1, "pairing": "shared"})
    run_dir = tmp_path / "results" / "tiny" / "r"
    command = [sys.executable, "-m", "harness.driver.cli", "run", str(path), "--results-dir", str(tmp_path / "results"),
               "--run-name", "r"]
    env = {**os.environ, "SPECSWEEP_HOME": str(specsweep_home), "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and sum(cell_id_counts(run_dir).values()) < 3:
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    before = cell_id_counts(run_dir)
    total = len(load_sweep(path).cells("cpu"))
    assert 3 <= sum(before.values()) < total, "the driver was not killed mid-sweep"
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{sum(before.values())} of {total} cells already recorded" in rerun.stderr
    after = cell_id_counts(run_dir)
    assert len(after) == total and set(after.values()) == {1}


def test_lost_node_cells_rerun_on_the_other(tmp_path, tiny_zoo):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": dict(NICENESS_CONFIG)})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        sweep = load_sweep(many_cells_sweep(tmp_path / "sweep.yaml"))
        removed: list[str] = []
        used_nodes: set[str] = set()

        def remove_a_busy_node(dispatcher, record):
            used_nodes.update(slot.node for slot in dispatcher.slots.values() if slot.node)
            busy = dispatcher.busy_workers()
            if removed or not busy:
                return
            node_id = dispatcher.slots[sorted(busy)[0]].node
            for node in nodes:
                if node.node_id == node_id:
                    removed.append(node_id)
                    cluster.remove_node(node)

        outcome = run_sweep(sweep, tmp_path / "run", address=cluster.address, log=lambda m: None,
                            on_record=remove_a_busy_node)
        counts = cell_id_counts(tmp_path / "run")
        expected = {cell.cell_id for cell in sweep.cells("cpu")}
        assert len(used_nodes) == 2, "workers were not spread over both nodes"
        assert removed, "no node was busy when the first result arrived"
        assert set(counts) == expected and set(counts.values()) == {1}
        assert outcome.failed == 0
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_hung_cell_times_out_alone_and_its_worker_is_replaced(tmp_path, tiny_zoo, fresh_ray):
    # The dispatcher's clock jumps an hour ahead once the hanging strategy has started: the hung cell passes its
    # limit at once, while every other cell (and the replacement worker's start) is timed on the same clock from
    # after the jump, so a slow, loaded machine cannot push a healthy cell past its limit.
    marker = tmp_path / "hanging"
    path = many_cells_sweep(tmp_path / "sweep.yaml", plugins=[str(TESTS / "plugins" / "probes.py")],
                            prompts=[{"name": "code", "source": "zoo:code", "count": 2}],
                            strategies=[{"name": "hang", "params": {"marker": str(marker)}},
                                        {"name": "speculative", "params": {"draft": "small", "gamma": 2}}],
                            run={"max_new_tokens": 6, "warmup_prompts": 0, "workers": 1, "num_cpus": 1,
                                 "cell_timeout_s": 600})
    start_local_ray(1, log_to_driver=False)
    messages: list[str] = []
    outcome = run_sweep(load_sweep(path), tmp_path / "run", log=messages.append,
                        clock=lambda: time.perf_counter() + (3600.0 if marker.exists() else 0.0))
    records = {record.cell["strategy"]: record for record in ResultStore(tmp_path / "run").records()}
    assert set(cell_id_counts(tmp_path / "run").values()) == {1}
    assert outcome.failed == 1 and outcome.ok == 1, [(r.cell["strategy"], r.error) for r in records.values()]
    assert records["hang"].error == "timed out after 600 s (run.cell_timeout_s)"
    assert records["speculative"].ok
    assert any("starting a replacement worker" in message for message in messages)


def test_the_default_cell_time_limit_scales_with_the_token_budget(tiny_zoo, tmp_path):
    small = load_sweep(many_cells_sweep(tmp_path / "a.yaml", run={"max_new_tokens": 8, "pairing": "interleaved"}))
    large = load_sweep(many_cells_sweep(tmp_path / "b.yaml", run={"max_new_tokens": 64, "pairing": "interleaved"}))
    fixed = load_sweep(many_cells_sweep(tmp_path / "c.yaml", run={"cell_timeout_s": 30}))
    a, b, c = (sweep.cells("cpu")[0] for sweep in (small, large, fixed))
    assert 600 < a.timeout_s() < b.timeout_s()
    assert b.timeout_s() - 600 == pytest.approx(8 * (a.timeout_s() - 600))
    assert c.timeout_s() == 30
