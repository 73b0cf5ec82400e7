"""Test plugins: strategies that raise on a poisoned prompt or report their environment."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.base import StrategyParams, Trace
from strategies.methods.autoregressive import Autoregressive
from strategies.registry import register
from strategies.sampling import Sampling


@dataclass(frozen=True)
class FaultyParams(StrategyParams):
    """``poison_length``: prompts of exactly this many tokens make ``generate`` raise."""

    poison_length: int = -1


@register("faulty")
class Faulty(Autoregressive):
    """Autoregressive decoding that raises ValueError on a poisoned prompt length."""

    Params = FaultyParams

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        if len(prompt_ids) == self.params.poison_length:
            raise ValueError(f"poisoned prompt of {len(prompt_ids)} tokens")
        return super().generate(prompt_ids, max_new_tokens, sampling)


@dataclass(frozen=True)
class EnvProbeParams(StrategyParams):
    """``variable``: the environment variable whose value the trace reports."""

    variable: str = "SPECSWEEP_PROBE"


@register("env_probe")
class EnvProbe(Autoregressive):
    """Autoregressive decoding that records one environment variable of its worker (to test runtime_env)."""

    Params = EnvProbeParams

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        import os

        trace = super().generate(prompt_ids, max_new_tokens, sampling)
        trace.extras["env"] = os.environ.get(self.params.variable)
        return trace


@dataclass(frozen=True)
class HangParams(StrategyParams):
    """``hang_s``: how long ``generate`` sleeps before decoding (long enough to stand for "never returns");
    ``marker``: a file it creates as it starts hanging (none if empty)."""

    hang_s: float = 3600.0
    marker: str = ""


@register("hang")
class Hang(Autoregressive):
    """Autoregressive decoding whose ``generate`` first sleeps ``hang_s`` seconds: a strategy that hangs."""

    Params = HangParams

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        import time
        from pathlib import Path

        if self.params.marker:
            Path(self.params.marker).touch()
        time.sleep(self.params.hang_s)
        return super().generate(prompt_ids, max_new_tokens, sampling)
