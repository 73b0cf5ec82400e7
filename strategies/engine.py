"""The decode loop every draft-then-verify strategy shares, and the proposer interface it drives.

A *proposer* turns the committed sequence and a token budget into a draft
(``strategies.verification.Proposal``) and hears back what the target kept
(``observe``, as transformers' ``update_candidate_strategy``). The loop owns the
rest, once for all methods: the prefill, the budget (never past
``max_new_tokens``), verification by the verifier for the draft's shape, step
accounting, EOS, and the Trace with its forward-pass counts.

A method that fits no proposer (e.g. the Hugging Face peers, which call
``generate()``) registers a whole ``Strategy`` instead; see ``strategies.base``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from harness.core.lm import CausalLM, HiddenStates, StepOutput
from strategies.base import Step, Strategy, Trace
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification, verify

# (target, sequence, draft, sampling, hidden states) -> what the target kept
Verifier = Callable[[CausalLM, list[int], Proposal, Sampling, HiddenStates], Verification]


class Proposer(ABC):
    """Drafts for one prompt at a time; ``begin`` starts a prompt, then ``propose`` / ``observe`` alternate.

    ``needs_hidden_states``: the target's hidden states come back in every
    ``Verification`` (and the prefill's in ``begin``): the last layer's (True), or named layers' concatenated (a
    tuple of ``output_hidden_states`` indices; EAGLE-3 sets it per target). ``first_token_from_prefill``:
    the first new token is the target's own pick after the prompt, counted as a
    step with nothing drafted (EAGLE, whose head needs the target's feature of
    the last prompt token); the target's cache then always holds the sequence
    minus its last token, as a tree verifier requires.
    """

    needs_hidden_states: HiddenStates = False
    first_token_from_prefill: ClassVar[bool] = False

    def begin(self, prompt_ids: list[int], prefill: StepOutput, sequence: list[int]) -> None:
        """Start a prompt: ``prefill`` is the target's prefill output, ``sequence`` the committed tokens so far."""

    @abstractmethod
    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        """A draft of at most ``budget`` tokens after ``sequence`` (``budget`` may be 0: then draft nothing)."""

    def observe(self, sequence: list[int], verification: Verification) -> None:
        """Feedback after a step: ``sequence`` as it was before it, and what the target kept."""

    def models(self) -> dict[str, CausalLM]:
        """The models besides the target whose forward passes count for this method, by role."""
        return {}

    def extras(self) -> dict[str, Any]:
        """Extra Trace fields (e.g. ``tree``, or per-level statistics)."""
        return {}


def decode(target: CausalLM, proposer: Proposer, prompt_ids: list[int], max_new_tokens: int,
           sampling: Sampling, start: StepOutput | None = None, verifier: Verifier = verify) -> tuple[list[int], list[Step]]:
    """Draft and verify until ``max_new_tokens`` tokens or an EOS; return the new tokens and the steps.

    ``start``: the target's cache already holds ``prompt_ids`` (e.g. a previous
    turn's cache, extended), and ``start`` is its output for them; otherwise the
    prompt is prefilled. ``verifier`` scores each draft (default: the exact chain
    or tree verifier for its shape; SpaDec's layer-skipping verifier replaces it).
    """
    prefill = start or target.prefill(prompt_ids, output_hidden_states=proposer.needs_hidden_states)
    sequence = list(prompt_ids)
    steps: list[Step] = []
    eos = target.eos_token_id

    def finished(new: list[int]) -> bool:
        return len(sequence) - len(prompt_ids) >= max_new_tokens or any(token in eos for token in new)

    if proposer.first_token_from_prefill:
        sequence.append(sampling.pick(prefill.logits[-1]))
        steps.append(Step(drafted=0, accepted=0))
    proposer.begin(prompt_ids, prefill, sequence)
    if proposer.first_token_from_prefill and finished(sequence[-1:]):
        return sequence[len(prompt_ids):], steps
    while True:
        budget = max(0, max_new_tokens - (len(sequence) - len(prompt_ids)) - 1)
        proposal = proposer.propose(sequence, budget, sampling)
        verification = verifier(target, sequence, proposal, sampling, proposer.needs_hidden_states)
        steps.append(Step(drafted=proposal.drafted, accepted=verification.accepted))
        proposer.observe(sequence, verification)
        sequence.extend(verification.tokens)
        if finished(verification.tokens):
            return sequence[len(prompt_ids):], steps


class ProposerStrategy(Strategy):
    """A strategy that is a proposer over the shared decode loop: subclasses implement ``proposer``."""

    @abstractmethod
    def proposer(self) -> Proposer:
        """A proposer for the next prompt (it may be the same object every time)."""

    def decoding_target(self) -> CausalLM:
        """The model that verifies (the sweep's target; a lossy method may decode with a modified one)."""
        return self.models.target

    def verifier(self) -> Verifier:
        """The verifier of every draft (default: the exact one for the draft's shape)."""
        return verify

    def extras(self) -> dict[str, Any]:
        """Extra Trace fields of the strategy itself, read after each prompt (the proposer's come too)."""
        return {}

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        target = self.decoding_target()
        proposer = self.proposer()
        tokens, steps = decode(target, proposer, prompt_ids, max_new_tokens, sampling, verifier=self.verifier())
        return self.finish(tokens, steps, {"target": target, **proposer.models()}, max_new_tokens,
                           **proposer.extras(), **self.extras())
