"""A depth-limited suffix trie with occurrence counts, grown one token at a time (SuffixDecoding's suffix tree).

Every substring of the text of at most ``max_depth`` tokens is a path from the root; a node's ``count`` is the
number of times its substring occurs in the text. Appending a token extends the ``max_depth`` most recent suffixes
by one node each, so the text grows in O(``max_depth``) per token, as SuffixDecoding's per-request tree does
(Oliaro et al., "SuffixDecoding: Extreme Speculative Decoding for Emerging AI Applications", 2024).

``speculate`` turns a match into SuffixDecoding's speculation tree: from the node of the matched pattern it adds,
best first, the child whose estimated acceptance ``D`` (the product of ``count(child) / count(parent)`` along its
path from the match) is highest, until the tree has its token budget or no child reaches ``min_token_prob``. The
tree's score is the sum of ``D`` over its nodes, the expected number of accepted tokens.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass
class Speculation:
    """A speculation tree below a matched pattern: ``tokens[i]`` with parent ``parents[i]`` (-1: the pattern's
    end, which is the sequence's last token) and estimated acceptance ``probs[i]``; parents come first."""

    pattern_length: int = 0
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)

    @property
    def score(self) -> float:
        """Expected accepted tokens: the sum of the nodes' estimated acceptance."""
        return sum(self.probs)


class SuffixTrie:
    """The text's substrings of at most ``max_depth`` tokens, as a trie whose nodes count their occurrences."""

    def __init__(self, max_depth: int) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.children: list[dict[int, int]] = [{}]  # node 0: the root (the empty string)
        self.counts: list[int] = [0]
        self.text: list[int] = []
        self.open: list[int] = []  # nodes of the suffixes shorter than max_depth that end the text, longest first

    def extend(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the text."""
        for token in tokens:
            grown = []
            for node in [*self.open, 0]:
                child = self.children[node].get(token)
                if child is None:
                    child = len(self.counts)
                    self.children[node][token] = child
                    self.children.append({})
                    self.counts.append(0)
                self.counts[child] += 1
                grown.append(child)
            self.text.append(token)
            self.counts[0] = len(self.text)
            self.open = grown[1:] if len(grown) >= self.max_depth else grown

    def end_document(self) -> None:
        """End the current document: the next token starts new suffixes instead of extending this document's."""
        self.open = []

    def node(self, pattern: list[int]) -> int | None:
        """The node of ``pattern`` (None when it never occurs or is longer than ``max_depth``)."""
        if len(pattern) > self.max_depth:
            return None
        node = 0
        for token in pattern:
            node = self.children[node].get(token)
            if node is None:
                return None
        return node

    def count(self, pattern: list[int]) -> int:
        """How many times ``pattern`` occurs in the text (0 when longer than ``max_depth``)."""
        node = self.node(pattern)
        return 0 if node is None else self.counts[node]

    def matches(self, context: list[int], longest: int) -> list[tuple[int, int]]:
        """(length, node) of every suffix of ``context`` of 1 to ``longest`` tokens that occurs in the text and was
        followed by some token there, shortest first (a longer suffix occurs only where its shorter ones do)."""
        found = []
        for length in range(1, min(longest, self.max_depth, len(context)) + 1):
            node = self.node(context[len(context) - length:])
            if node is None:
                break
            if self.children[node]:
                found.append((length, node))
        return found

    def speculate(self, node: int, pattern_length: int, max_tokens: int, min_token_prob: float,
                  chain: bool = False) -> Speculation:
        """SuffixDecoding's greedy speculation tree below ``node`` (see the module docstring): at most
        ``max_tokens`` nodes, each with estimated acceptance >= ``min_token_prob``. ``chain``: only the most
        frequent child of each node is a candidate, so the tree is one path."""
        tree = Speculation(pattern_length=pattern_length)
        frontier: list[tuple[float, int, int, int, int]] = []  # (-D, tie-break, token, trie node, tree parent)
        ties = itertools.count()  # equal D: the child seen first (insertion order) goes first

        def push(parent_node: int, parent_index: int, parent_prob: float) -> None:
            total = self.counts[parent_node]
            children = self.children[parent_node].items()
            if chain and children:
                children = [max(children, key=lambda item: self.counts[item[1]])]
            for token, child in children:
                prob = parent_prob * self.counts[child] / total
                if prob >= min_token_prob:
                    heapq.heappush(frontier, (-prob, next(ties), token, child, parent_index))

        push(node, -1, 1.0)
        while frontier and len(tree.tokens) < max_tokens:
            negative, _, token, child, parent_index = heapq.heappop(frontier)
            tree.tokens.append(token)
            tree.parents.append(parent_index)
            tree.probs.append(-negative)
            push(child, len(tree.tokens) - 1, -negative)
        return tree
