"""How one decoding run is timed, for sweep cells and the adaptive-drafts loop alike: the device synchronised
around ``generate``, the wall time set on the trace, then the target's 1-token probe (the drift guard's input,
outside the wall time)."""

from __future__ import annotations

import time

import torch

from harness.lm import CausalLM, synchronize
from strategies.base import Strategy, Trace
from strategies.sampling import Sampling


def timed_generate(strategy: Strategy, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                   device: torch.device, probe: CausalLM | None = None) -> Trace:
    """``strategy.generate`` with synchronised wall-clock time in ``trace.wall_s`` and, when ``probe`` is given,
    its 1-token forward time in ``trace.extras["probe_s"]``."""
    synchronize(device)
    started = time.perf_counter()
    trace = strategy.generate(prompt_ids, max_new_tokens, sampling)
    synchronize(device)
    trace.wall_s = time.perf_counter() - started
    if probe is not None:
        trace.extras = {**trace.extras, "probe_s": probe.time_single_step()}
    return trace
