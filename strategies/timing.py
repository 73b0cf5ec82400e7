"""How one decoding run is timed, for sweep cells and the adaptive-drafts loop alike: the device synchronised
around ``generate``, the wall time set on the trace, the process's CPU run and run-queue wait over the run, then
the target's 1-token probe (the drift guard's inputs; the probe is outside the wall time)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from harness.core.cpu_share import run_and_wait_s, snapshot
from harness.core.lm import CausalLM, synchronize
from strategies.base import Strategy, Trace
from strategies.batched_engine import BatchCapable, BatchTrace
from strategies.sampling import Sampling


def timed_generate(strategy: Strategy, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                   device: torch.device, probe: CausalLM | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> Trace:
    """``strategy.generate`` (after its untimed ``prepare``) with synchronised wall time by ``clock`` in
    ``trace.wall_s``, the process's CPU seconds run and waited in ``trace.extras["cpu_run_s"]``/``["cpu_wait_s"]`` (where Linux reports them) and, when ``probe``
    is given, its 1-token forward time in ``trace.extras["probe_s"]``."""
    strategy.prepare([prompt_ids], max_new_tokens)
    synchronize(device)
    threads = snapshot()
    started = clock()
    trace = strategy.generate(prompt_ids, max_new_tokens, sampling)
    synchronize(device)
    trace.wall_s = clock() - started
    cpu = run_and_wait_s(threads, snapshot())
    if cpu is not None:
        trace.extras = {**trace.extras, "cpu_run_s": cpu[0], "cpu_wait_s": cpu[1]}
    if probe is not None:
        trace.extras = {**trace.extras, "probe_s": probe.time_single_step()}
    return trace


def timed_generate_batch(strategy: BatchCapable, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                         device: torch.device, probe: CausalLM | None = None,
                         clock: Callable[[], float] = time.perf_counter) -> BatchTrace:
    """``timed_generate`` for a batch: ``strategy.generate_batch`` timed the same way, the batch's wall time in
    ``wall_s`` and its CPU seconds and probe in ``extras``; each row's first- and last-token times read ``clock``."""
    strategy.prepare(prompts, max_new_tokens)
    synchronize(device)
    threads = snapshot()
    started = clock()
    batch = strategy.generate_batch(prompts, max_new_tokens, sampling, clock=clock)
    synchronize(device)
    batch.wall_s = clock() - started
    cpu = run_and_wait_s(threads, snapshot())
    if cpu is not None:
        batch.extras.update(cpu_run_s=cpu[0], cpu_wait_s=cpu[1])
    if probe is not None:
        batch.extras["probe_s"] = probe.time_single_step()
    return batch
