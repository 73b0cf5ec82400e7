"""The baseline: one target forward pass per token, through the same wrapper and cache as every strategy."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.base import Step, Strategy, StrategyParams, Trace
from strategies.registry import register
from strategies.sampling import Sampling


@dataclass(frozen=True)
class AutoregressiveParams(StrategyParams):
    """The baseline takes no parameters."""


@register("autoregressive")
class Autoregressive(Strategy):
    """Plain decoding with the target: prefill, then one cached forward per new token."""

    Params = AutoregressiveParams

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        target = self.models.target
        logits = target.prefill(prompt_ids).logits[-1]
        tokens: list[int] = []
        steps: list[Step] = []
        while True:
            token = sampling.pick(logits)
            tokens.append(token)
            steps.append(Step(drafted=0, accepted=0))
            if len(tokens) >= max_new_tokens or token in target.eos_token_id:
                break
            logits = target.extend([token]).logits[-1]
        return self.finish(tokens, steps, {"target": target}, max_new_tokens)
