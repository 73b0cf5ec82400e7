"""How many tokens a draft model proposes per step: a fixed ``gamma``, or the length a cost model expects to be
fastest (``schedule: adaptive``).

The adaptive schedule follows Leviathan et al. (2023, §3.5): with i.i.d. per-token acceptance rate α, a step
that drafts γ tokens commits (1 − α^(γ+1)) / (1 − α) tokens on average, and costs γ draft forwards plus one
target forward of width γ + 1. The paper takes that target forward as costing the same for every width, which
holds on a GPU but not on a CPU: on 2 cores, SmolLM2-135M's forwards of 1, 2, 3, 4 and 16 tokens took 57, 98,
120, 88 and 97 ms (not even monotone in width: the matrix kernels change with the row count). So the costs are
measured once per cell on the machine itself (the median forward time at every width, taken as it is), and γ = 0,
a plain target step, is allowed: where the draft cannot pay for itself, the schedule stops drafting.

At batch size B > 1 one length serves the whole batch: every drafted position costs one batched draft forward
however many rows draft, and the target verifies all rows in one forward as wide as the longest. So the costs are
measured with B rows (``calibrate_batched``), and α is counted over every row's steps.

α is estimated from the cell's own verifications, as accepted tokens over acceptance trials (a step that drafted
γ and kept k tries k + 1 tokens, or γ when all were kept), under a uniform Beta prior, and used optimistically
(posterior mean plus one standard deviation), so that a short unlucky start does not stop drafting. Once the
estimate says no draft can pay, the schedule stops drafting for the rest of the cell: no new evidence arrives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.core.batched_lm import BatchedCausalLM
from harness.core.lm import CausalLM

CALIBRATION_CONTEXT = 64  # tokens before the timed forwards
CALIBRATION_REPEATS = 5


def expected_tokens(alpha: float, gamma: int) -> float:
    """Mean tokens one step commits when it drafts ``gamma`` tokens each accepted with probability ``alpha``."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def best_draft_length(alpha: float, draft_cost: float, verify_costs: list[float]) -> int:
    """The γ in 0..len(verify_costs) − 1 with the most tokens per unit of time, where ``verify_costs[γ]`` is the
    target's cost of verifying γ drafted tokens (a forward of width γ + 1) and ``draft_cost`` one draft forward,
    both in the same unit; ties go to the shorter draft."""
    rates = [expected_tokens(alpha, gamma) / (gamma * draft_cost + cost) for gamma, cost in enumerate(verify_costs)]
    return max(range(len(rates)), key=lambda gamma: (rates[gamma], -gamma))


@dataclass
class AcceptanceEstimate:
    """Per-token acceptance counted from verifications: ``accepted`` successes out of ``trials``."""

    accepted: int = 0
    trials: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        """Count one step that drafted ``drafted`` tokens of which the target kept ``accepted``."""
        if drafted:
            self.accepted += accepted
            self.trials += accepted + (1 if accepted < drafted else 0)

    def optimistic(self) -> float:
        """Posterior mean plus one standard deviation of α under a uniform prior, capped at 1."""
        a, b = self.accepted + 1, self.trials - self.accepted + 1
        mean = a / (a + b)
        deviation = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        return min(1.0, mean + deviation)


class DraftLength:
    """A fixed draft length (``schedule: constant``)."""

    def __init__(self, gamma: int) -> None:
        self.gamma = gamma

    def next(self) -> int:
        """Tokens to draft in the next step (before the loop's budget cuts it)."""
        return self.gamma

    def observe(self, drafted: int, accepted: int) -> None:
        """What the last step drafted and the target kept."""

    def summary(self) -> dict[str, object]:
        """What the schedule decided with, for the cell record (empty for a fixed length)."""
        return {}


@dataclass
class CostModelLength(DraftLength):
    """The draft length with the most expected tokens per second, up to ``max_gamma`` (``schedule: adaptive``).

    ``draft_cost`` and ``verify_costs`` are in seconds (see ``calibrate``); one instance serves every prompt of a
    cell, so what it learns about α carries over.
    """

    max_gamma: int
    draft_cost: float
    verify_costs: list[float]
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)

    @classmethod
    def calibrate(cls, target: CausalLM, draft: CausalLM, max_gamma: int) -> "CostModelLength":
        """Measure the draft's 1-token forward and the target's forwards of width 1..max_gamma + 1 (medians)."""
        target.time_steps([1], CALIBRATION_CONTEXT, 1)  # untimed: the first forwards after loading run slow
        verify = target.time_steps(list(range(1, max_gamma + 2)), CALIBRATION_CONTEXT, CALIBRATION_REPEATS)
        return cls(max_gamma, draft.time_steps([1], CALIBRATION_CONTEXT, CALIBRATION_REPEATS)[0], verify)

    @classmethod
    def calibrate_batched(cls, target: BatchedCausalLM, draft: BatchedCausalLM, max_gamma: int,
                          batch_size: int) -> "CostModelLength":
        """``calibrate`` at ``batch_size`` rows: a batched 1-token draft forward, and batched target forwards of
        width 1..max_gamma + 1."""
        target.time_steps([1], batch_size, CALIBRATION_CONTEXT, 1)  # untimed warm-up, as in ``calibrate``
        verify = target.time_steps(list(range(1, max_gamma + 2)), batch_size, CALIBRATION_CONTEXT, CALIBRATION_REPEATS)
        return cls(max_gamma, draft.time_steps([1], batch_size, CALIBRATION_CONTEXT, CALIBRATION_REPEATS)[0], verify)

    def next(self) -> int:
        return best_draft_length(self.estimate.optimistic(), self.draft_cost, self.verify_costs)

    def observe(self, drafted: int, accepted: int) -> None:
        self.estimate.add(drafted, accepted)

    def summary(self) -> dict[str, object]:
        return {
            "alpha_estimate": self.estimate.accepted / self.estimate.trials if self.estimate.trials else None,
            "draft_cost_s": self.draft_cost,
            "verify_costs_s": list(self.verify_costs),
        }
