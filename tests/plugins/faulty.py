"""A test plugin: autoregressive decoding that raises on prompts of one given length."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.autoregressive import Autoregressive
from strategies.base import StrategyParams, Trace
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
