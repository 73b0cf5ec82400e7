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

Sampling over a tree: the EAGLE-2 reference accepts a child x with
probability p(x)/q(x) against the draft distribution q, which is exact only when
children are *sampled* from q; EAGLE-2 picks them deterministically (top-k).
We therefore use the rule that is exact for deterministic, distinct
candidates: visit the children in order, accept child x with probability
p(x) under the current residual p, otherwise zero p(x) and renormalise; if all
are rejected, draw from the residual. The output is distributed exactly as the
target's own sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.lm import CausalLM
from harness.tree import greedy_path, tree_inputs
from strategies.base import Step, Strategy, StrategyParams, Trace
from strategies.eagle_head import load_head_lm
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.speculative import verify


@dataclass(frozen=True)
class HeadParams(StrategyParams):
    """Where the head comes from: ``head``, a ``train`` entry of the sweep, or ``head_dir``, a saved or published head."""

    head: str = ""
    head_dir: str = ""

    def validate(self, where: str) -> None:
        if bool(self.head) == bool(self.head_dir):
            raise ConfigError(f"{where}.head", "give exactly one of head (a train entry) or head_dir (a head directory)",
                              "e.g. head: head with train: {head: train/eagle_zoo.yaml}, or head_dir: /path/to/EAGLE-head")
        if self.head_dir and not Path(self.head_dir).expanduser().is_dir():
            raise ConfigError(f"{where}.head_dir", f"{self.head_dir} is not a directory",
                              "give the absolute path of a saved head (head.json) or a published one (config.json)")

    def uses_artifacts(self) -> list[str]:
        return [self.head] if self.head else []


@dataclass(frozen=True)
class EagleParams(HeadParams):
    """EAGLE's head and ``gamma``, the chain length."""

    gamma: int = 4

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.gamma < 1:
            raise ConfigError(f"{where}.gamma", f"must be >= 1, got {self.gamma}", "draft at least one token per step")


@dataclass(frozen=True)
class Eagle2Params(HeadParams):
    """EAGLE-2's head and tree budget: ``total_tokens`` verified (root included), ``depth`` levels, ``top_k`` branching."""

    total_tokens: int = 60
    depth: int = 5
    top_k: int = 10

    def validate(self, where: str) -> None:
        super().validate(where)
        for name, low in (("total_tokens", 2), ("depth", 1), ("top_k", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{where}.{name}", f"must be >= {low}, got {getattr(self, name)}")


@dataclass
class HeadState:
    """The head's prediction after its last committed entry: logits of the next token and its feature."""

    logits: torch.Tensor
    feature: torch.Tensor


class EagleBase(Strategy):
    """What the chain and the tree share: the two-cache prefill and the post-verification head update."""

    _loaded_head: CausalLM | None = None

    def head(self) -> CausalLM:
        """The drafting head: the sweep's trained artefact, or the head directory loaded once for this strategy."""
        if self.params.head:
            return self.models.artifact(self.params.head)
        if self._loaded_head is None:
            self._loaded_head = load_head_lm(Path(self.params.head_dir).expanduser(), self.models.target)
        return self._loaded_head

    def start(self, prompt_ids: list[int], sampling: Sampling) -> tuple[int, HeadState | None]:
        """Prefill the target (its logits give the first token) and the head; return that token and the head state."""
        target, head = self.models.target, self.head()
        out = target.prefill(prompt_ids, output_hidden_states=True)
        first = sampling.pick(out.logits[-1])
        return first, self.update_head(head, 0, list(prompt_ids[1:]) + [first], out.hidden_states, prefill=True)

    @staticmethod
    def update_head(head: CausalLM, committed: int, tokens: list[int], features: torch.Tensor,
                    prefill: bool = False) -> HeadState:
        """Drop the head's draft entries beyond ``committed`` and append (feature, next token) pairs."""
        inputs = {"features": features}
        if prefill:
            out = head.prefill(tokens, output_hidden_states=True, extra_inputs=inputs)
        else:
            head.crop(committed)
            out = head.extend(tokens, output_hidden_states=True, extra_inputs=inputs)
        return HeadState(logits=out.logits[-1], feature=out.hidden_states[-1])

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        target, head = self.models.target, self.head()
        first, state = self.start(prompt_ids, sampling)
        sequence = list(prompt_ids) + [first]
        steps = [Step(drafted=0, accepted=0)]
        prompt_length = len(prompt_ids)
        while not self.finished(len(sequence) - prompt_length, sequence[-1:], max_new_tokens):
            budget = max_new_tokens - (len(sequence) - prompt_length) - 1
            new, features, drafted = self.step(sequence, state, budget, sampling)
            steps.append(Step(drafted=drafted, accepted=len(new) - 1))
            state = self.update_head(head, len(sequence) - 1, new, features)
            sequence.extend(new)
            if self.finished(len(sequence) - prompt_length, new, max_new_tokens):
                break
        return self.finish(sequence[prompt_length:], steps, {"target": target, "head": head}, max_new_tokens,
                           **self.trace_extras())

    def trace_extras(self) -> dict[str, bool]:
        """Extra trace fields: ``tree`` marks tree drafting (the report's chain bound does not apply)."""
        return {}

    def step(self, sequence: list[int], state: HeadState, budget: int,
             sampling: Sampling) -> tuple[list[int], torch.Tensor, int]:
        """Draft and verify once; return the new tokens, the target's features before each, and the drafted count."""
        raise NotImplementedError


@register("eagle")
class Eagle(EagleBase):
    """EAGLE with a chain draft: ``gamma`` head steps, one target pass, speculative-sampling acceptance."""

    Params = EagleParams

    def step(self, sequence: list[int], state: HeadState, budget: int,
             sampling: Sampling) -> tuple[list[int], torch.Tensor, int]:
        target, head = self.models.target, self.head()
        gamma = min(self.params.gamma, budget)
        drafted, q_rows = [], []
        logits, feature = state.logits, state.feature
        for index in range(gamma):
            q = sampling.probs(logits)
            token = sampling.choose(q)
            drafted.append(token)
            q_rows.append(q)
            if index + 1 < gamma:
                out = head.extend([token], output_hidden_states=True, extra_inputs={"features": feature[None]})
                logits, feature = out.logits[-1], out.hidden_states[-1]
        out = target.extend(sequence[-1:] + drafted, output_hidden_states=True)
        p_rows = sampling.probs(out.logits)
        if drafted:
            accepted, following = verify(p_rows, torch.stack(q_rows), drafted, sampling)
        else:
            accepted, following = 0, sampling.choose(p_rows[-1])
        target.crop(len(sequence) + accepted)
        return drafted[:accepted] + [following], out.hidden_states[: accepted + 1], len(drafted)


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


def accept_tree(tree: DraftTree, p_rows: torch.Tensor, sampling: Sampling) -> tuple[list[int], int]:
    """Walk the verified tree from the root; return the accepted node path and the token that follows it.

    Greedy: follow the child equal to the target's argmax. Sampling: the exact
    rule for deterministic candidates described in the module docstring.
    """
    if sampling.greedy:
        return greedy_path(tree.tokens, tree.parents, [int(row.argmax()) for row in p_rows])
    children: dict[int, list[int]] = {}
    for index in range(1, len(tree.tokens)):
        children.setdefault(tree.parents[index], []).append(index)
    path = [0]
    while True:
        residual = p_rows[path[-1]].clone()
        following = None
        for child in sorted(children.get(path[-1], []), key=lambda i: -tree.scores[i]):
            token = tree.tokens[child]
            total = float(residual.sum())
            if total <= 0:
                break
            if sampling.uniform(residual.device) * total < float(residual[token]):
                following = child
                break
            residual[token] = 0.0
        if following is None:
            total = float(residual.sum())
            return path, sampling.draw(residual / total if total > 0 else p_rows[path[-1]])
        path.append(following)


@register("eagle2")
class Eagle2(EagleBase):
    """EAGLE-2: a context-dependent draft tree grown by draft confidence, verified in one tree-masked pass."""

    Params = Eagle2Params

    def trace_extras(self) -> dict[str, bool]:
        return {"tree": True}

    def grow(self, state: HeadState, root: int, committed: int) -> DraftTree:
        """Expand the draft tree level by level with the head, feeding each level's frontier in one pass."""
        head, top_k = self.head(), self.params.top_k
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

    def step(self, sequence: list[int], state: HeadState, budget: int,
             sampling: Sampling) -> tuple[list[int], torch.Tensor, int]:
        target = self.models.target
        committed = len(sequence) - 1
        tree, _ = self.grow(state, sequence[-1], committed).select(min(self.params.total_tokens - 1, max(budget, 0)))
        mask, positions = tree_inputs(tree.parents, committed, target.device)
        out = target.extend(tree.tokens, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        path, following = accept_tree(tree, sampling.probs(out.logits), sampling)
        target.keep(list(range(committed)) + [committed + node for node in path])
        new = [tree.tokens[node] for node in path[1:]] + [following]
        return new, out.hidden_states[path], len(tree.tokens) - 1
