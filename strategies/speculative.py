"""Classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

A draft proposes ``gamma`` tokens one at a time; the target scores all of them
in one forward pass. Greedy: a drafted token is kept while it equals the
target's argmax, and the first mismatch is replaced by that argmax. Sampling:
token x drawn from the draft's q is kept with probability min(1, p(x)/q(x));
the first rejected one is replaced by a draw from norm(max(0, p - q)); when all
are kept, one more token is drawn from the target's next distribution. Either
way the output is distributed exactly as the target's own decoding. Both KV
caches are cropped back to the accepted prefix, never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import ConfigError
from harness.lm import CausalLM
from strategies.base import Step, Strategy, StrategyParams, Trace
from strategies.registry import register
from strategies.sampling import Sampling


@dataclass(frozen=True)
class SpeculativeParams(StrategyParams):
    """``draft``: a name from the sweep's ``models.drafts``; ``gamma``: tokens drafted per step."""

    draft: str
    gamma: int = 4

    def validate(self, where: str) -> None:
        if self.gamma < 1:
            raise ConfigError(f"{where}.gamma", f"must be >= 1, got {self.gamma}", "draft at least one token per step")

    def uses_drafts(self) -> list[str]:
        return [self.draft]


def verify(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafted: list[int],
    sampling: Sampling,
) -> tuple[int, int]:
    """Speculative-sampling acceptance of ``drafted`` tokens.

    ``target_probs`` has ``len(drafted) + 1`` rows (the target's distribution
    before each drafted token, plus the one after the last); ``draft_probs``
    has one row per drafted token. Returns ``(accepted, next_token)``: how many
    drafted tokens are kept, and the token that follows them (the correction
    after a rejection, or the bonus token after full acceptance).
    """
    for index, token in enumerate(drafted):
        p, q = target_probs[index], draft_probs[index]
        if sampling.greedy:
            best = int(p.argmax())
            if token != best:
                return index, best
            continue
        if sampling.uniform(p.device) * float(q[token]) < float(p[token]):
            continue
        residual = torch.clamp(p - q, min=0.0)
        total = float(residual.sum())
        # p == q up to rounding: any draw from p is exact then.
        return index, sampling.draw(residual / total if total > 0 else p)
    return len(drafted), sampling.choose(target_probs[len(drafted)])


def draft_tokens(draft: CausalLM, sequence: list[int], count: int, sampling: Sampling) -> tuple[list[int], list[torch.Tensor]]:
    """Let ``draft`` propose ``count`` tokens after ``sequence``; return them with their draft distributions.

    The draft's cache is first extended with whatever of ``sequence`` it has not
    processed yet (the previous step's correction or bonus token), in the same
    forward pass that yields the first proposal.
    """
    pending = sequence[draft.length:]
    logits = draft.extend(pending).logits[-1] if pending else draft.last_logits
    tokens, probs = [], []
    for index in range(count):
        q = sampling.probs(logits)
        token = sampling.choose(q)
        tokens.append(token)
        probs.append(q)
        if index + 1 < count:
            logits = draft.extend([token]).logits[-1]
    return tokens, probs


def target_distributions(target: CausalLM, sequence: list[int], drafted: list[int], sampling: Sampling) -> torch.Tensor:
    """The target's distributions before each drafted token and after the last, from one forward pass."""
    pending = sequence[target.length:]
    if not pending and not drafted:
        return sampling.probs(target.last_logits[None])
    before = target.last_logits if not pending else None
    logits = target.extend(pending + drafted).logits
    if before is None:
        rows = logits[len(pending) - 1:]
    else:
        rows = torch.cat([before[None], logits])
    return sampling.probs(rows)


def verify_step(target: CausalLM, sequence: list[int], drafted: list[int], q_rows: torch.Tensor | None,
                sampling: Sampling) -> tuple[int, list[int]]:
    """Score ``drafted`` with the target in one pass, apply the acceptance rule and crop the target's cache.

    Returns how many drafted tokens were accepted and the tokens to append
    (the accepted ones plus the correction or bonus token, which the target
    processes at the next step). With nothing drafted it is a plain target step.
    """
    p_rows = target_distributions(target, sequence, drafted, sampling)
    if drafted:
        accepted, following = verify(p_rows, q_rows, drafted, sampling)
    else:
        accepted, following = 0, sampling.choose(p_rows[-1])
    target.crop(len(sequence) + accepted)
    return accepted, drafted[:accepted] + [following]


@register("speculative")
class Speculative(Strategy):
    """Draft ``gamma`` tokens with a small model, verify them with the target in one pass."""

    Params = SpeculativeParams

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        target, draft = self.models.target, self.models.draft(self.params.draft)
        target.prefill(prompt_ids)
        draft.prefill(prompt_ids)
        sequence = list(prompt_ids)
        prompt_length = len(prompt_ids)
        steps: list[Step] = []
        while True:
            produced = len(sequence) - prompt_length
            gamma = min(self.params.gamma, max_new_tokens - produced - 1)
            drafted, q_rows = draft_tokens(draft, sequence, gamma, sampling) if gamma > 0 else ([], [])
            accepted, new = verify_step(target, sequence, drafted, torch.stack(q_rows) if q_rows else None, sampling)
            steps.append(Step(drafted=len(drafted), accepted=accepted))
            # The draft, like the target, keeps exactly the accepted prefix.
            draft.crop(min(draft.length, len(sequence) + accepted))
            sequence.extend(new)
            if self.finished(len(sequence) - prompt_length, new, max_new_tokens):
                break
        return self.finish(sequence[prompt_length:], steps, {"target": target, "draft": draft}, max_new_tokens)
