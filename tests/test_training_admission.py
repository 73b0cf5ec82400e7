"""Training jobs start only when the cluster can place them: Ray Train gives up on a worker group it cannot
place within a minute, so jobs that would queue for the same GPU run one after another."""

from __future__ import annotations

from types import SimpleNamespace

from harness.driver.scheduler import jobs_that_fit
from training.launch import LaunchSettings


def job(name: str, use_gpu: str = "true", cpus: int = 2) -> SimpleNamespace:
    return SimpleNamespace(name=name, config=SimpleNamespace(launch=LaunchSettings(use_gpu=use_gpu, cpus_per_worker=cpus)))


def test_gpu_jobs_on_one_gpu_start_one_at_a_time():
    queued = [job("a"), job("b"), job("c")]
    resources = {"GPU": 1, "CPU": 16}
    options = {"num_gpus": 1, "num_cpus": 1}
    assert [j.name for j in jobs_that_fit(queued, [], 0, options, "cuda", resources)] == ["a"]
    assert jobs_that_fit(queued[1:], [queued[0]], 0, options, "cuda", resources) == []
    two_gpus = {"GPU": 2, "CPU": 16}
    assert [j.name for j in jobs_that_fit(queued, [], 0, options, "cuda", two_gpus)] == ["a", "b"]
    assert [j.name for j in jobs_that_fit(queued, [], 1, options, "cuda", two_gpus)] == ["a"]  # a worker holds one


def test_cpu_jobs_start_while_their_cpus_fit_and_one_always_starts():
    queued = [job("a", "false", 2), job("b", "false", 2)]
    options = {"num_gpus": 0, "num_cpus": 1}
    assert [j.name for j in jobs_that_fit(queued, [], 0, options, "cpu", {"CPU": 4})] == ["a", "b"]
    assert [j.name for j in jobs_that_fit(queued, [], 0, options, "cpu", {"CPU": 2})] == ["a"]
    big = [job("big", "false", 8)]
    assert [j.name for j in jobs_that_fit(big, [], 0, options, "cpu", {"CPU": 2})] == ["big"]  # fails loudly in Ray
