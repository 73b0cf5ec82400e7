"""The decode loop at batch size B > 1: B prompts drafted and verified together, each row lossless on its own.

Rows accept different numbers of tokens per step; the target's batched cache
(:class:`harness.core.batched_lm.BatchedCausalLM`) masks out what a row
rejected instead of recomputing it. Each row keeps its own budget, EOS, steps
and proposer state, and its tokens are decided by the same acceptance rule as
at batch size 1 (``strategies.verification.accept_chain`` for a chain,
``accept_tree`` for a tree), on the logits of its own positions, so greedy
output per row equals the batch-1 baseline's and sampling keeps the target's
distribution per row.

Batching policy: *static*. A batch is B prompts of a shard; a row that
finishes (budget or EOS) stays idle, fed nothing, until every row is done, and
the next B prompts start a fresh batch. The baseline runs on the same policy,
so a throughput ratio compares like with like.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness.core.batched_lm import BatchedCausalLM, BatchPrefill
from harness.core.lm import HiddenStates
from strategies.base import Step, Strategy, Trace, forward_stats, truncate
from strategies.engine import Proposer
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification, accept_chain, accept_tree


class BatchProposer(ABC):
    """Drafts for a batch of rows; ``begin`` starts a batch, then ``propose`` / ``observe`` alternate.

    ``propose`` gets every row's committed sequence and budget; a row whose
    budget is 0 (it is finished, or may add only the target's own next token)
    gets an empty draft (a chain, or a tree of its root alone).
    ``needs_hidden_states``: the target's hidden states come with the prefill
    (``begin``) and with every ``Verification`` (EAGLE's features; a tuple of ``output_hidden_states`` indices
    asks for those layers concatenated, as EAGLE-3 does).
    """

    needs_hidden_states: HiddenStates = False

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        """Start a batch of ``prompts``; ``prefill`` is the target's prefill of them."""

    @abstractmethod
    def propose(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        """One draft per row, a chain or a tree, of at most ``budgets[b]`` tokens after ``sequences[b]``."""

    def observe(self, sequences: list[list[int]], verifications: list[Verification | None]) -> None:
        """Feedback after a step: the sequences as they were before it, and what the target kept per row (None
        for a row that took no part)."""

    def models(self) -> dict[str, BatchedCausalLM]:
        """The batched models besides the target whose forward passes count for this method, by role."""
        return {}

    def extras(self) -> dict[str, Any]:
        """Extra fields of every row's Trace after a batch (e.g. the draft length schedule's summary)."""
        return {}

    def row_extras(self, row: int) -> dict[str, Any]:
        """Extra fields of row ``row``'s Trace alone (e.g. the domain its draft was routed to)."""
        return {}


class RowwiseProposer(BatchProposer):
    """A batch proposer made of one single-row proposer per row, for methods that draft without a model (prompt
    lookup, the baseline's empty draft): each row's proposer sees only its own sequence."""

    def __init__(self, make: Callable[[], Proposer]) -> None:
        self.make = make
        self.rows: list[Proposer] = []

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        self.rows = [self.make() for _ in prompts]
        for proposer, prompt in zip(self.rows, prompts):
            proposer.begin(prompt, None, list(prompt))  # no prefill output: these proposers read none

    def propose(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        return [proposer.propose(sequence, budget, sampling) if budget else Proposal([])
                for proposer, sequence, budget in zip(self.rows, sequences, budgets)]

    def observe(self, sequences: list[list[int]], verifications: list[Verification | None]) -> None:
        for proposer, sequence, verification in zip(self.rows, sequences, verifications):
            if verification is not None:
                proposer.observe(sequence, verification)


@dataclass
class RowResult:
    """One row of a batch: its new tokens, its steps, and when (on the loop's clock, seconds after the batch
    started) its first new token and its last were committed."""

    tokens: list[int]
    steps: list[Step] = field(default_factory=list)
    first_token_s: float = 0.0
    finished_s: float = 0.0


def verify_batch(target: BatchedCausalLM, sequences: list[list[int]], proposals: list[Proposal | None],
                 sampling: Sampling, hidden_states: HiddenStates = False) -> list[Verification | None]:
    """Score each row's draft after its sequence in one batched target pass and accept it by ``accept_chain`` (a
    chain) or ``accept_tree`` (a tree); each row's cache then holds its sequence plus the accepted tokens. A row
    whose proposal is None takes no part.

    Per row this is ``strategies.verification.verify_chain`` or ``verify_tree``: the tokens the row's cache lacks
    (the previous correction; a tree's root) are fed with the draft, and a row with nothing pending and nothing
    drafted reads the target's distribution after its cache without a forward pass. ``hidden_states``: each
    Verification carries the target's features before each of its tokens, as at batch size 1, where the row's
    last token was pending (not in the first step after the prefill, which caches whole prompts).
    """
    lengths = target.lengths
    before = target.last_logits
    pending = [sequence[lengths[row]:] if proposal is not None else [] for row, (sequence, proposal)
               in enumerate(zip(sequences, proposals))]
    inputs, parents = [], []
    for row, proposal in enumerate(proposals):
        if proposal is not None and proposal.is_tree:
            if pending[row] != proposal.tokens[:1]:
                raise ValueError("verify_batch: a tree's root must be its row's one pending token")
            inputs.append(list(proposal.tokens))
            parents.append(proposal.parents)
        else:
            inputs.append(pending[row] + (proposal.tokens if proposal is not None else []))
            parents.append(None)
    out = target.extend(inputs, output_hidden_states=hidden_states, parents=parents) if any(inputs) else None
    results: list[Verification | None] = []
    kept: list[list[int]] = []
    for row, proposal in enumerate(proposals):
        if proposal is None:
            results.append(None)
            kept.append([])
            continue
        if proposal.is_tree:
            path, following = accept_tree(proposal.tokens, proposal.parents,
                                          proposal.scores or [0.0] * len(proposal.tokens),
                                          sampling.probs(out.row(row)), sampling)
            results.append(Verification(accepted=len(path) - 1,
                                        tokens=[proposal.tokens[node] for node in path[1:]] + [following],
                                        hidden_states=out.row_hidden(row)[path] if hidden_states else None,
                                        path=path))
            kept.append(path)
            continue
        drafted = proposal.tokens
        if inputs[row]:
            logits = out.row(row)
            logits = logits[len(pending[row]) - 1:] if pending[row] else torch.cat([before[row][None], logits])
        else:
            logits = before[row][None]
        p_rows = sampling.probs(logits)
        if drafted:
            q_rows = proposal.q
            if q_rows is None and not sampling.greedy:  # a deterministic draft's distribution is one-hot
                q_rows = torch.nn.functional.one_hot(torch.tensor(drafted, device=p_rows.device),
                                                     p_rows.shape[-1]).float()
            accepted, following = accept_chain(p_rows, q_rows, drafted, sampling)
        else:
            accepted, following = 0, sampling.choose(p_rows[-1])
        hidden = None
        if hidden_states and pending[row]:  # none in the first step after the prefill, which caches the whole prompt
            first = len(pending[row]) - 1
            hidden = out.row_hidden(row)[first: first + accepted + 1]
        results.append(Verification(accepted=accepted, tokens=drafted[:accepted] + [following],
                                    hidden_states=hidden))
        kept.append(list(range(len(pending[row]) + accepted)))
    if out is not None:
        target.keep_block(kept)
    return results


def batch_problem(strategy: type[Strategy], params: Any) -> str | None:
    """Why ``strategy`` with ``params`` cannot decode a batch of prompts at once (None: it can)."""
    if not issubclass(strategy, BatchCapable):
        return f"{strategy.name} decodes one prompt at a time"
    return strategy.cannot_batch(params)


def decode_batch(target: BatchedCausalLM, proposer: BatchProposer, prompts: list[list[int]], max_new_tokens: int,
                 sampling: Sampling, clock: Callable[[], float] | None = None) -> list[RowResult]:
    """Draft and verify ``prompts`` as one batch until every row has ``max_new_tokens`` tokens or an EOS.

    ``clock`` (default: the target's) times each row's first and last committed token from the batch's start.
    """
    clock = clock or target.clock
    started = clock()
    eos = target.eos_token_id
    proposer.begin(prompts, target.prefill(prompts, output_hidden_states=proposer.needs_hidden_states))
    sequences = [list(prompt) for prompt in prompts]
    rows = [RowResult(tokens=[]) for _ in prompts]
    done = [False] * len(prompts)
    while not all(done):
        budgets = [0 if done[row] else max(0, max_new_tokens - len(rows[row].tokens) - 1) for row in range(len(rows))]
        proposals: list[Proposal | None] = list(proposer.propose(sequences, budgets, sampling))
        proposals = [None if done[row] else proposal for row, proposal in enumerate(proposals)]
        verifications = verify_batch(target, sequences, proposals, sampling, proposer.needs_hidden_states)
        proposer.observe(sequences, verifications)
        now = clock() - started
        for row, verification in enumerate(verifications):
            if verification is None:
                continue
            result = rows[row]
            if not result.tokens:
                result.first_token_s = now
            result.steps.append(Step(drafted=proposals[row].drafted, accepted=verification.accepted))
            result.tokens.extend(verification.tokens)
            sequences[row].extend(verification.tokens)
            if len(result.tokens) >= max_new_tokens or any(token in eos for token in verification.tokens):
                done[row] = True
                result.finished_s = now
    return rows


@dataclass
class BatchTrace:
    """What a strategy did on one batch: a Trace per row (tokens, steps; ``extras`` holds ``first_token_s`` and
    ``finished_s``), and the forward statistics of each model over the whole batch."""

    rows: list[Trace]
    forward: dict[str, dict[str, float]]
    wall_s: float = 0.0  # set by the runner
    extras: dict[str, Any] = field(default_factory=dict)  # cpu_run_s, cpu_wait_s, probe_s (strategies.timing)

    @property
    def new_tokens(self) -> int:
        return sum(row.new_tokens for row in self.rows)

    def per_row(self, cost_units: Callable[[dict[str, dict[str, float]]], float]) -> list[Trace]:
        """The rows as Traces a cell record holds: each with an equal share of the batch's wall time, CPU time and
        forward counts (so a cell's sums over its rows are the batch's, and its speedup is the ratio of batch
        throughputs), the batch's probe, and ``extras["batch"]``: the batch's size, the row's index, the batch's
        wall time and the row's first- and last-token times."""
        share = 1.0 / len(self.rows)
        forward = {role: {key: value if key == "parameters" else value * share for key, value in stats.items()}
                   for role, stats in self.forward.items()}
        shared = {key: self.extras[key] * share for key in ("cpu_run_s", "cpu_wait_s") if key in self.extras}
        if "probe_s" in self.extras:
            shared["probe_s"] = self.extras["probe_s"]
        traces = []
        for index, row in enumerate(self.rows):
            timing = {"size": len(self.rows), "row": index, "wall_s": self.wall_s,
                      "first_token_s": row.extras.get("first_token_s"), "finished_s": row.extras.get("finished_s")}
            extras = {key: value for key, value in row.extras.items() if key not in ("first_token_s", "finished_s")}
            traces.append(Trace(tokens=row.tokens, steps=row.steps, forward={role: dict(stats) for role, stats
                                                                               in forward.items()},
                                cost_units=cost_units(forward), wall_s=self.wall_s * share,
                                extras={**extras, **shared, "batch": timing}))
        return traces


class BatchCapable(ABC):
    """Mixin of a ``Strategy`` that decodes B prompts at once (``run.batch_size`` > 1). A strategy without it
    runs at batch size 1 only, and the sweep says so before any model loads."""

    @abstractmethod
    def batch_proposer(self) -> BatchProposer:
        """A proposer for the next batch."""

    @classmethod
    def cannot_batch(cls, params: Any) -> str | None:
        """Why these params cannot decode at batch size > 1 (None: they can)."""
        return None

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                       clock: Callable[[], float] | None = None) -> BatchTrace:
        """Decode ``prompts`` as one batch (see ``decode_batch``); one Trace per row."""
        assert isinstance(self, Strategy), "BatchCapable is a mixin of Strategy classes"
        target = BatchedCausalLM.of(self.models.target)
        proposer = self.batch_proposer()
        results = decode_batch(target, proposer, prompts, max_new_tokens, sampling, clock)
        eos = target.eos_token_id
        extras = proposer.extras()
        rows = [Trace(tokens=truncate(result.tokens, max_new_tokens, eos), steps=result.steps,
                      extras={**extras, **proposer.row_extras(index), "first_token_s": result.first_token_s,
                              "finished_s": result.finished_s})
                for index, result in enumerate(results)]
        return BatchTrace(rows=rows, forward=forward_stats({"target": target, **proposer.models()}))
