"""EAGLE (chain) and EAGLE-2 (dynamic draft tree) over a trained EAGLE head (Li et al. 2024a, 2024b).

The head (:mod:`strategies.eagle_head`) drafts from the target's last hidden
states. Both strategies keep two caches in step: after every verification the
target holds the committed sequence minus its last token, and the head holds
one entry (feature, next token) per target position, rebuilt from the
target's *real* features of the accepted tokens (draft-time entries, built on
predicted features, are dropped).

The first new token comes from the target's prefill (the head needs the
target's feature of the last prompt token and the token after it); it counts
as one verification step with nothing drafted.

``eagle`` drafts a chain of ``gamma`` tokens and verifies it like classic
speculative sampling. ``eagle2`` grows a tree: the root's ``top_k`` children,
then at each further depth the ``top_k`` frontier nodes of highest cumulative
draft log-probability are fed to the head in one pass (tree attention mask),
each proposing ``top_k`` children; after ``depth`` levels all candidates are
re-ranked by cumulative log-probability and the best ``total_tokens - 1`` (plus
the root) are verified by the target in one pass.

Both are proposers over the shared decode loop; the tree is verified by
``strategies.verification.verify_tree``, whose sampling rule is exact for
EAGLE-2's deterministic top-k children (the reference's p/q rule is not; see
``accept_tree``).

At batch size B > 1 (``run.batch_size``) the head keeps one batched cache of
B rows (:class:`harness.core.batched_lm.BatchedCausalLM`) and drafts every
row's chain step, or every row's tree level, in one head pass; a tree level's
entries are scratch, seen only by their descendants, and the target verifies
every row's chain or tree in one pass (``strategies.batched_engine``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core.batched_lm import BatchedCausalLM, BatchPrefill
from harness.core.errors import ConfigError
from harness.core.lm import CausalLM, StepOutput
from strategies.base import StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer
from strategies.eagle_head import load_head_lm
from strategies.engine import Proposer, ProposerStrategy
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification


@dataclass(frozen=True)
class HeadParams(StrategyParams):
    """Where the head comes from: ``head``, a ``train`` entry of the sweep, or ``head_dir``, a saved or published head."""

    head: str = ""
    head_dir: str = ""

    def problems(self, where: str) -> Iterator[ConfigError]:
        if bool(self.head) == bool(self.head_dir):
            yield ConfigError(f"{where}.head", "give exactly one of head (a train entry) or head_dir (a head directory)",
                              "e.g. head: head with train: {head: train/eagle_zoo.yaml}, or head_dir: /path/to/EAGLE-head")
        if self.head_dir and not Path(self.head_dir).expanduser().is_dir():
            yield ConfigError(f"{where}.head_dir", f"{self.head_dir} is not a directory",
                              "give the absolute path of a saved head (head.json) or a published one (config.json)")

    def uses_artifacts(self) -> list[str]:
        return [self.head] if self.head else []


@dataclass(frozen=True)
class EagleParams(HeadParams):
    """EAGLE's head and ``gamma``, the chain length."""

    gamma: int = 4

    def problems(self, where: str) -> Iterator[ConfigError]:
        yield from super().problems(where)
        if self.gamma < 1:
            yield ConfigError(f"{where}.gamma", f"must be >= 1, got {self.gamma}", "draft at least one token per step")


@dataclass(frozen=True)
class Eagle2Params(HeadParams):
    """EAGLE-2's head and tree budget: ``total_tokens`` verified (root included), ``depth`` levels, ``top_k`` branching."""

    total_tokens: int = 60
    depth: int = 5
    top_k: int = 10

    def problems(self, where: str) -> Iterator[ConfigError]:
        yield from super().problems(where)
        for name, low in (("total_tokens", 2), ("depth", 1), ("top_k", 1)):
            if getattr(self, name) < low:
                yield ConfigError(f"{where}.{name}", f"must be >= {low}, got {getattr(self, name)}")


@dataclass
class HeadState:
    """The head's prediction after its last committed entry: logits of the next token and its feature."""

    logits: torch.Tensor
    feature: torch.Tensor


class HeadProposer(Proposer):
    """What the chain and the tree share: the head's cache, kept one (feature, token) entry per target position.

    After every verification the head drops its draft-time entries and appends
    the target's real features of the accepted tokens (``observe``).
    """

    needs_hidden_states = True
    first_token_from_prefill = True

    def __init__(self, head: CausalLM) -> None:
        self.head = head
        self.state: HeadState | None = None

    def begin(self, prompt_ids: list[int], prefill: StepOutput, sequence: list[int]) -> None:
        self.state = self.update(0, list(prompt_ids[1:]) + sequence[len(prompt_ids):], prefill.hidden_states,
                                 prefill=True)

    def observe(self, sequence: list[int], verification: Verification) -> None:
        self.state = self.update(len(sequence) - 1, verification.tokens, verification.hidden_states)

    def update(self, committed: int, tokens: list[int], features: torch.Tensor, prefill: bool = False) -> HeadState:
        """Drop the head's draft entries beyond ``committed`` and append (feature, next token) pairs."""
        inputs = {"features": features}
        if prefill:
            out = self.head.prefill(tokens, output_hidden_states=True, extra_inputs=inputs)
        else:
            self.head.crop(committed)
            out = self.head.extend(tokens, output_hidden_states=True, extra_inputs=inputs)
        return HeadState(logits=out.logits[-1], feature=out.hidden_states[-1])

    def models(self) -> dict[str, CausalLM]:
        return {"head": self.head}


class ChainHeadProposer(HeadProposer):
    """EAGLE: ``gamma`` head steps, each fed the head's own predicted feature."""

    def __init__(self, head: CausalLM, gamma: int) -> None:
        super().__init__(head)
        self.gamma = gamma

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        count = min(self.gamma, budget)
        drafted, q_rows = [], []
        logits, feature = self.state.logits, self.state.feature
        if sampling.greedy and count:
            return Proposal(self.greedy(logits, feature, count))
        for index in range(count):
            q = sampling.probs(logits)
            token = sampling.choose(q)
            drafted.append(token)
            q_rows.append(q)
            if index + 1 < count:
                out = self.head.extend([token], output_hidden_states=True, extra_inputs={"features": feature[None]})
                logits, feature = out.logits[-1], out.hidden_states[-1]
        return Proposal(drafted, q=torch.stack(q_rows) if q_rows else None)

    def greedy(self, logits: torch.Tensor, feature: torch.Tensor, count: int) -> list[int]:
        """``count`` greedy head steps with every argmax kept on the device (one transfer for the draft)."""
        chosen = [logits.argmax(-1, keepdim=True)]
        while len(chosen) < count:
            out = self.head.extend(chosen[-1], output_hidden_states=True, extra_inputs={"features": feature[None]})
            logits, feature = out.logits[-1], out.hidden_states[-1]
            chosen.append(logits.argmax(-1, keepdim=True))
        return torch.cat(chosen).tolist()


@dataclass
class DraftTree:
    """A draft tree under construction: node 0 is the root (the last committed token)."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]  # cumulative draft log-probability (0 at the root)
    depths: list[int]

    def add(self, token: int, parent: int, score: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(self.depths[parent] + 1)
        return len(self.tokens) - 1

    def select(self, count: int) -> "tuple[DraftTree, list[int]]":
        """The root plus the ``count`` best nodes by score, parents before children; and their old indices.

        A child's score never exceeds its parent's, and ties go to the shallower
        node, so the selection always contains every selected node's ancestors.
        """
        ranked = sorted(range(1, len(self.tokens)), key=lambda i: (-self.scores[i], self.depths[i], i))[:count]
        kept = [0] + sorted(ranked, key=lambda i: (self.depths[i], i))
        new_index = {old: new for new, old in enumerate(kept)}
        tree = DraftTree([self.tokens[0]], [-1], [0.0], [0])
        for old in kept[1:]:
            tree.add(self.tokens[old], new_index[self.parents[old]], self.scores[old])
        return tree, kept


class TreeHeadProposer(HeadProposer):
    """EAGLE-2: a tree grown by cumulative draft log-probability, re-ranked to ``total_tokens`` nodes."""

    def __init__(self, head: CausalLM, params: "Eagle2Params") -> None:
        super().__init__(head)
        self.params = params

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        tree = self.grow(sequence[-1], len(sequence) - 1)
        tree, _ = tree.select(min(self.params.total_tokens - 1, budget))
        return Proposal(tree.tokens, parents=tree.parents, scores=tree.scores)

    def grow(self, root: int, committed: int) -> DraftTree:
        """Expand the draft tree level by level with the head, feeding each level's frontier in one pass."""
        head, top_k, state = self.head, self.params.top_k, self.state
        tree = DraftTree([root], [-1], [0.0], [0])
        log_probs = torch.log_softmax(state.logits.float(), dim=-1)
        values, tokens = log_probs.topk(top_k)
        frontier = [tree.add(int(t), 0, float(v)) for v, t in zip(values, tokens)]
        feature_of_parent = {index: state.feature for index in frontier}  # input feature of each frontier node
        slots: dict[int, int] = {}  # node -> its entry in the head's cache
        for _ in range(self.params.depth - 1):
            past = head.length
            mask = torch.zeros(len(frontier), past + len(frontier), dtype=torch.bool)
            mask[:, :committed] = True
            for row, node in enumerate(frontier):
                mask[row, past + row] = True
                ancestor = tree.parents[node]
                while ancestor > 0:
                    mask[row, slots[ancestor]] = True
                    ancestor = tree.parents[ancestor]
            positions = torch.tensor([committed - 1 + tree.depths[node] for node in frontier])
            features = torch.stack([feature_of_parent[node] for node in frontier])
            out = head.extend([tree.tokens[node] for node in frontier], attention_mask=mask.to(head.device),
                              position_ids=positions, output_hidden_states=True, extra_inputs={"features": features})
            for row, node in enumerate(frontier):
                slots[node] = past + row
            values, tokens = torch.log_softmax(out.logits.float(), dim=-1).topk(top_k, dim=-1)
            scores = values + torch.tensor([tree.scores[node] for node in frontier], device=values.device)[:, None]
            children = [[tree.add(token, node, score) for token, score in zip(row_tokens, row_scores)]
                        for node, row_tokens, row_scores in zip(frontier, tokens.tolist(), scores.tolist())]
            best = scores.flatten().topk(min(top_k, scores.numel())).indices.tolist()
            frontier = [children[index // top_k][index % top_k] for index in best]
            feature_of_parent = {children[index // top_k][index % top_k]: out.hidden_states[index // top_k]
                                 for index in best}
        return tree

    def extras(self) -> dict[str, bool]:
        return {"tree": True}  # the report's chain bound does not apply


class BatchedHeadProposer(BatchProposer):
    """What the batched chain and tree share: the head's batched cache, one (feature, token) entry per target
    position per row, as ``HeadProposer`` keeps it for one row.

    The first step drafts nothing: each row's first token is the target's own pick after its prompt (as at batch
    size 1), and the head's prefill, on the prompt's features and that token, follows it in ``observe``.
    """

    needs_hidden_states = True

    def __init__(self, head: BatchedCausalLM) -> None:
        self.head = head
        self.prompts: list[list[int]] = []
        self.prompt_features: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None  # [batch, vocab]: each row's next-token logits from the head
        self.features: torch.Tensor | None = None  # [batch, hidden]: each row's predicted feature

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        self.prompts, self.prompt_features = prompts, prefill.hidden_states
        self.logits = self.features = None

    def propose(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        if self.logits is None:
            return [Proposal([]) for _ in sequences]  # the first token comes from the target's prefill
        return self.draft(sequences, budgets, sampling)

    @abstractmethod
    def draft(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        """Each row's draft from the head's state after its committed entries."""

    def observe(self, sequences: list[list[int]], verifications: list[Verification | None]) -> None:
        if self.logits is None:
            rows = [prompt[1:] + verification.tokens for prompt, verification in zip(self.prompts, verifications)]
            out = self.head.prefill(rows, output_hidden_states=True, extra_inputs={"features": self.prompt_features})
            self.logits = out.last_logits.clone()
            self.features = torch.stack([hidden[-1] for hidden in out.hidden_states])
            return
        lengths = self.head.lengths
        self.head.crop([length if verification is None else len(sequence) - 1
                        for length, sequence, verification in zip(lengths, sequences, verifications)])
        rows = [verification.tokens if verification is not None else [] for verification in verifications]
        if not any(rows):
            return
        features = [verification.hidden_states if verification is not None else None for verification in verifications]
        out = self.head.extend(rows, output_hidden_states=True, extra_inputs={"features": features})
        self.logits, self.features = self.logits.clone(), self.features.clone()
        for row, tokens in enumerate(rows):
            if tokens:
                self.logits[row] = out.row(row)[-1]
                self.features[row] = out.row_hidden(row)[-1]

    def models(self) -> dict[str, BatchedCausalLM]:
        return {"head": self.head}


class BatchedChainHeadProposer(BatchedHeadProposer):
    """``ChainHeadProposer`` for a batch: each drafted position of every row in one head pass."""

    def __init__(self, head: BatchedCausalLM, gamma: int) -> None:
        super().__init__(head)
        self.gamma = gamma

    def draft(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        counts = [min(self.gamma, budget) for budget in budgets]
        drafted: list[list[int]] = [[] for _ in sequences]
        q_rows: list[list[torch.Tensor]] = [[] for _ in sequences]
        logits, features = self.logits, self.features
        for index in range(max(counts, default=0)):
            for row, count in enumerate(counts):
                if index < count:
                    q = sampling.probs(logits[row])
                    drafted[row].append(sampling.choose(q))
                    q_rows[row].append(q)
            feeding = [index + 1 < count for count in counts]
            if not any(feeding):
                break
            out = self.head.extend([[drafted[row][-1]] if feed else [] for row, feed in enumerate(feeding)],
                                   output_hidden_states=True,
                                   extra_inputs={"features": [features[row][None] if feed else None
                                                              for row, feed in enumerate(feeding)]})
            logits, features = logits.clone(), features.clone()
            for row, feed in enumerate(feeding):
                if feed:
                    logits[row] = out.row(row)[-1]
                    features[row] = out.row_hidden(row)[-1]
        return [Proposal(tokens, q=torch.stack(rows)) if tokens else Proposal([])
                for tokens, rows in zip(drafted, q_rows)]


class BatchedTreeHeadProposer(BatchedHeadProposer):
    """``TreeHeadProposer`` for a batch: every row's tree grows one level per head pass; a level's entries are
    scratch (never committed), each seen by its own descendants only."""

    def __init__(self, head: BatchedCausalLM, params: "Eagle2Params") -> None:
        super().__init__(head)
        self.params = params

    def draft(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        trees = self.grow([sequence[-1] for sequence in sequences], [budget > 0 for budget in budgets])
        proposals = []
        for tree, budget in zip(trees, budgets):
            tree, _ = tree.select(min(self.params.total_tokens - 1, budget))
            proposals.append(Proposal(tree.tokens, parents=tree.parents, scores=tree.scores))
        return proposals

    def grow(self, roots: list[int], growing: list[bool]) -> list[DraftTree]:
        """Each growing row's draft tree, expanded level by level as ``TreeHeadProposer.grow`` does for one row."""
        top_k = self.params.top_k
        trees = [DraftTree([root], [-1], [0.0], [0]) for root in roots]
        values, tokens = torch.log_softmax(self.logits.float(), dim=-1).topk(top_k, dim=-1)
        frontiers = [[tree.add(int(t), 0, float(v)) for v, t in zip(row_values, row_tokens)] if grow else []
                     for tree, grow, row_values, row_tokens in zip(trees, growing, values, tokens)]
        parent_features = [{node: self.features[row] for node in frontier} for row, frontier in enumerate(frontiers)]
        slots: list[dict[int, int]] = [{} for _ in trees]  # node -> its scratch entry in the head's cache
        for level in range(self.params.depth - 1):
            if not any(frontiers):
                break
            start = self.head.slots
            attend = []
            for tree, frontier, row_slots in zip(trees, frontiers, slots):
                seen = []
                for node in frontier:
                    ancestors, ancestor = [], tree.parents[node]
                    while ancestor > 0:
                        ancestors.append(row_slots[ancestor])
                        ancestor = tree.parents[ancestor]
                    seen.append(ancestors)
                attend.append(seen)
            out = self.head.extend(
                [[tree.tokens[node] for node in frontier] for tree, frontier in zip(trees, frontiers)],
                output_hidden_states=True, parents=[[-1] * len(frontier) for frontier in frontiers], attend=attend,
                depths=[[level] * len(frontier) for frontier in frontiers], commit=False,
                extra_inputs={"features": [torch.stack([features[node] for node in frontier]) if frontier else None
                                           for frontier, features in zip(frontiers, parent_features)]})
            for row, frontier in enumerate(frontiers):
                if not frontier:
                    continue
                tree = trees[row]
                for index, node in enumerate(frontier):
                    slots[row][node] = start + index
                values, tokens = torch.log_softmax(out.row(row).float(), dim=-1).topk(top_k, dim=-1)
                scores = values + torch.tensor([tree.scores[node] for node in frontier], device=values.device)[:, None]
                children = [[tree.add(token, node, score) for token, score in zip(row_tokens, row_scores)]
                            for node, row_tokens, row_scores in zip(frontier, tokens.tolist(), scores.tolist())]
                best = scores.flatten().topk(min(top_k, scores.numel())).indices.tolist()
                frontiers[row] = [children[index // top_k][index % top_k] for index in best]
                hidden = out.row_hidden(row)
                parent_features[row] = {children[index // top_k][index % top_k]: hidden[index // top_k]
                                        for index in best}
        return trees


class HeadStrategy(ProposerStrategy, BatchCapable):
    """A strategy drafting with an EAGLE head: the sweep's trained artefact, or a head directory loaded once."""

    _loaded_head: CausalLM | None = None

    def head(self) -> CausalLM:
        if self.params.head:
            return self.models.artifact(self.params.head)
        if self._loaded_head is None:
            self._loaded_head = load_head_lm(Path(self.params.head_dir).expanduser(), self.models.target)
        return self._loaded_head


@register("eagle")
class Eagle(HeadStrategy):
    """EAGLE with a chain draft: ``gamma`` head steps, one target pass, speculative-sampling acceptance."""

    Params = EagleParams

    def proposer(self) -> Proposer:
        return ChainHeadProposer(self.head(), self.params.gamma)

    def batch_proposer(self) -> BatchProposer:
        return BatchedChainHeadProposer(BatchedCausalLM.of(self.head()), self.params.gamma)


@register("eagle2")
class Eagle2(HeadStrategy):
    """EAGLE-2: a context-dependent draft tree grown by draft confidence, verified in one tree-masked pass."""

    Params = Eagle2Params

    def proposer(self) -> Proposer:
        return TreeHeadProposer(self.head(), self.params)

    def batch_proposer(self) -> BatchProposer:
        return BatchedTreeHeadProposer(BatchedCausalLM.of(self.head()), self.params)
