"""SpaDec's verifier: pre-verify the whole draft tree in the target's first K layers, pick what goes deeper, verify
that in the remaining layers of a D-LLM (layer-skipping) target.

It pairs with EAGLE-2's tree proposer (``strategies.methods.eagle.TreeHeadProposer``) over the shared decode loop:

1. the first ``split`` (K) layers run over every tree node (``harness.core.dllm.SkippingLM.forward_split``);
2. predictor on: the acceptance predictor scores each node from its hidden state entering layer K and
   ``strategies.spadec_selection.select_path`` keeps one root-to-leaf path; predictor off: every node is kept;
3. the kept nodes go through the remaining layers, where a layer is skipped only when its router says skip for
   every one of them; the target's logits on those nodes decide acceptance by the tree rule
   (``strategies.verification.accept_tree``), over the kept sub-tree.

With every router executing and the predictor off this is EAGLE-2's verification exactly. Layer skipping changes
the target's outputs, so SpaDec decoding is lossy against the dense target (reported as such).

K defaults to 6 on a 32-layer target, scaled by depth (``default_split``). SpaDec's public code ships the
predictor path unreachable (it needs ``retrieve_indices``, which is never passed); this follows the paper.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from harness.core.dllm import SkippingLM, SkipStats
from harness.core.errors import ConfigError
from harness.core.metrics import roc_auc
from harness.core.records import PromptRecord
from harness.core.tables import ReportView, markdown_table
from harness.core.tree import tree_inputs
from strategies.base import ModelSet, StrategyParams, Trace
from strategies.engine import Proposer, ProposerStrategy
from strategies.methods.autoregressive import NothingProposer
from strategies.methods.eagle import Eagle2Params, TreeHeadProposer
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.spadec_selection import AcceptancePredictor, select_path
from strategies.verification import Proposal, Verification, accept_tree, keep_path, tree_root


def default_split(layers: int) -> int:
    """K: 6 of 32 layers, scaled to ``layers`` (at least 1, and leaving at least one layer after it)."""
    return max(1, min(layers - 1, round(6 * layers / 32)))


@dataclass
class PredictorLog:
    """Per tree node: the predictor's probability and whether the node ended on the accepted path (the predictor's
    AUC, and its training labels). The labels are exact with the predictor off, when every node is verified; with
    it on, a node left out of the deep layers counts as rejected."""

    probabilities: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    deep_nodes: int = 0  # nodes that went through the layers after K
    tree_nodes: int = 0
    keep_features: bool = False  # also keep each non-root node's hidden state entering layer K (training data)
    features: list[torch.Tensor] = field(default_factory=list)


class SpaDecVerifier:
    """The verifier described in the module docstring; a ``strategies.engine.Verifier``."""

    def __init__(self, split: int, predictor: AcceptancePredictor | None = None, log: PredictorLog | None = None,
                 scorer: AcceptancePredictor | None = None) -> None:
        self.split = split
        self.predictor = predictor  # prunes the tree when given (predictor on)
        self.scorer = scorer or predictor  # scores nodes for the log (AUC) even with the predictor off
        self.log = log if log is not None else PredictorLog()

    def __call__(self, target: SkippingLM, sequence: list[int], proposal: Proposal, sampling: Sampling,
                 hidden_states: bool = False) -> Verification:
        if not proposal.is_tree:
            raise ValueError("SpaDec verifies draft trees (pair it with eagle2's tree proposer)")
        committed = tree_root(target, sequence, proposal, "SpaDec")
        parents = proposal.parents
        mask, positions = tree_inputs(parents, committed, target.device)
        scores: list[float] = []

        def select(entering: torch.Tensor) -> list[int]:
            if self.log.keep_features:
                self.log.features.append(entering[1:].detach().float().cpu())
            if self.scorer is not None:
                with torch.inference_mode():
                    scores.extend(self.scorer(entering.to(next(self.scorer.parameters()).dtype)).float().tolist())
            if self.predictor is None:
                return list(range(len(parents)))
            return select_path(parents, scores)

        out, chosen, _ = target.forward_split(proposal.tokens, mask, positions, self.split, select)
        position = {node: index for index, node in enumerate(chosen)}
        sub_parents = [-1] + [position[parents[node]] for node in chosen[1:]]
        sub_tokens = [proposal.tokens[node] for node in chosen]
        draft_scores = proposal.scores or [0.0] * len(parents)
        sub_scores = [draft_scores[node] for node in chosen]
        sub_path, following = accept_tree(sub_tokens, sub_parents, sub_scores, sampling.probs(out.logits), sampling)
        path = [chosen[index] for index in sub_path]
        verification = keep_path(target, committed, proposal, path, following,
                                 out.hidden_states[sub_path] if hidden_states else None)
        on_path = set(path)
        if scores:
            self.log.probabilities.extend(scores[1:])
        if scores or self.log.keep_features:
            self.log.accepted.extend(node in on_path for node in range(1, len(parents)))
        self.log.deep_nodes += len(chosen)
        self.log.tree_nodes += len(parents)
        return verification


@dataclass(frozen=True)
class DLLMParams(StrategyParams):
    """``dllm``: the sweep's ``train`` entry (kind ``dllm``) holding the D-LLM target."""

    dllm: str = ""

    def problems(self, where: str) -> Iterator[ConfigError]:
        if not self.dllm:
            yield ConfigError(f"{where}.dllm", "required parameter is missing",
                              "name a train entry of kind dllm, e.g. dllm: dllm with train: {dllm: train/dllm_zoo.yaml}")

    def uses_artifacts(self) -> list[str]:
        return [self.dllm]



# ---------------------------------------------------------------------------- stats and report section


@dataclass(frozen=True)
class LayerSkipStats:
    """Layer skipping over a group's turns: skipped / routed token-layers, the share of tree nodes that went
    through the deep layers (SpaDec), and the predictor's AUC weighted by the nodes it scored (None where none)."""

    skipped_fraction: float | None
    deep_share: float | None
    predictor_auc: float | None

    @classmethod
    def pool(cls, prompts: list[PromptRecord]) -> "LayerSkipStats":
        """The stats of the turns of ``prompts``, from each turn's extras."""
        skipped = routed = deep = nodes = scored = 0
        auc_sum = 0.0
        for prompt in prompts:
            for turn in prompt.turns:
                extras = turn.strategy.extras
                skipped += extras.get("skipped_layers", 0)
                routed += extras.get("routed_layers", 0)
                deep += extras.get("deep_nodes", 0)
                nodes += extras.get("tree_nodes", 0)
                if extras.get("predictor_auc") is not None:
                    auc_sum += extras["predictor_auc"] * extras.get("predictor_nodes", 0)
                    scored += extras.get("predictor_nodes", 0)
        return cls(skipped / routed if routed else None, deep / nodes if nodes else None,
                   auc_sum / scored if scored else None)


def dllm_match(view: ReportView, strategies: set[str]) -> dict[tuple, float]:
    """For each group of ``strategies``: the share of its turns whose tokens equal those of the same run's ``dllm``
    cell on the same prompt set, shard and D-LLM target (D-LLM's own autoregressive output), keyed like the groups."""
    reference: dict[tuple, dict[tuple, list[int]]] = {}
    for record in view.records.values():
        if record.ok and record.strategy == "dllm":
            key = (record.target_name, record.prompt_set, record.cell["shard"])
            reference[key] = {(p.prompt_id, i): t.strategy.tokens for p in record.prompts for i, t in enumerate(p.turns)}
    matches: dict[tuple, list[bool]] = {}
    for record in view.records.values():
        key = (record.target_name, record.prompt_set, record.cell["shard"])
        if not record.ok or record.strategy == "dllm" or record.strategy not in strategies or key not in reference:
            continue
        group = (record.target_name, record.strategy, view.config_label(record), record.prompt_set)
        for prompt in record.prompts:
            for index, turn in enumerate(prompt.turns):
                expected = reference[key].get((prompt.prompt_id, index))
                if expected is not None:
                    matches.setdefault(group, []).append(turn.strategy.tokens == expected)
    return {group: sum(values) / len(values) for group, values in matches.items() if values}


def layer_skipping_section(view: ReportView) -> list[str]:
    """Lossy layer-skipping strategies: skipped layers, token match against the dense baseline and against D-LLM's
    autoregressive output, SpaDec's deep share and predictor AUC."""
    groups = view.groups
    frame = groups.dropna(subset=["skipped_fraction"]) if "skipped_fraction" in groups else groups.iloc[0:0]
    if frame.empty:
        return []
    against = dllm_match(view, set(frame["strategy"]))
    frame = frame.assign(match_dllm=[against.get((r.target, r.strategy, r.params, r.prompt_set))
                                     for r in frame.itertuples()])
    columns = {**view.target_column(), "strategy": "strategy", "params": "params",
               "prompt_set": "prompt set", "speedup": "speedup", "cost_speedup": "cost speedup", "tau": "τ",
               "skipped_fraction": "skipped layers", "deep_share": "tree nodes verified deep",
               "predictor_auc": "predictor AUC", "match_rate": "token match (dense)",
               "match_dllm": "token match (D-LLM autoregressive)"}
    return ["## Layer skipping (lossy)", "",
            "Skipped layers: routed token-layers skipped / routed token-layers. Tree nodes verified deep: SpaDec's "
            "share of draft-tree nodes that went through the layers after K (1 with the predictor off). Predictor "
            "AUC: on the nodes it scored (exact labels with the predictor off). Token match: turns equal to the "
            "dense baseline's output, and to the D-LLM target's own autoregressive output (`dllm` in this run).",
            "", markdown_table(frame, columns), ""]


class LayerSkipping(ProposerStrategy):
    """What the strategies decoding with a ``SkippingLM`` share: lossy; each prompt's skipped layers counted afresh
    and reported; CS Drafting's parameter-count cost with the skipped layers left out (Σ calls × parameters, minus
    Σ over passes of the skipped layers' parameters)."""

    lossy = True
    report_section = staticmethod(layer_skipping_section)

    @classmethod
    def pooled_stats(cls, prompts: list[PromptRecord]) -> dict[str, Any]:
        return asdict(LayerSkipStats.pool(prompts))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        self.decoding_target().skips = SkipStats()
        return super().generate(prompt_ids, max_new_tokens, sampling)

    def cost_units(self, forward: dict[str, dict[str, float]]) -> float:
        dense = float(sum(stats["calls"] * stats["parameters"] for stats in forward.values()))
        return dense - float(self.decoding_target().skips.skipped_parameters)

    def extras(self) -> dict[str, object]:
        skips = self.decoding_target().skips
        return {"skipped_layers": skips.skipped, "routed_layers": skips.routed, "lossy": True}


@register("dllm")
class DLLMDecoding(LayerSkipping):
    """The D-LLM target decoding autoregressively: one layer-skipping forward per token (lossy: the target's
    outputs change where layers are skipped). Its trace gives the skipped share of routed token-layers."""

    Params = DLLMParams

    def decoding_target(self) -> SkippingLM:
        return self.models.artifact(self.params.dllm)

    def proposer(self) -> Proposer:
        return NothingProposer()


PREDICTOR_MODES = ("on", "off")


@dataclass(frozen=True)
class SpaDecParams(StrategyParams):
    """``spadec``: the sweep's ``train`` entry (kind ``spadec``: D-LLM target, head, predictor); ``predictor``
    on or off; ``split`` K (0: the artefact's); EAGLE-2's tree budget."""

    spadec: str = ""
    predictor: str = "on"
    split: int = 0
    total_tokens: int = 60
    depth: int = 5
    top_k: int = 10

    def problems(self, where: str) -> Iterator[ConfigError]:
        if not self.spadec:
            yield ConfigError(f"{where}.spadec", "required parameter is missing",
                              "name a train entry of kind spadec, e.g. spadec: spadec with train: {spadec: train/spadec_zoo.yaml}")
        if self.predictor not in PREDICTOR_MODES:
            yield ConfigError(f"{where}.predictor", f"expected on or off, got {self.predictor!r}")
        for name, low in (("split", 0), ("total_tokens", 2), ("depth", 1), ("top_k", 1)):
            if getattr(self, name) < low:
                yield ConfigError(f"{where}.{name}", f"must be >= {low}, got {getattr(self, name)}")

    def uses_artifacts(self) -> list[str]:
        return [self.spadec]


@register("spadec")
class SpaDec(LayerSkipping):
    """SpaDec: EAGLE-2's tree over a D-LLM target, pre-verified in K layers, then the predictor's path (on) or the
    whole tree (off) through the remaining layers (lossy: layers are skipped). Its trace gives the skipped layers,
    the share of tree nodes that went deep and the predictor's AUC on the nodes it scored."""

    Params = SpaDecParams

    def __init__(self, params: SpaDecParams, models: ModelSet) -> None:
        super().__init__(params, models)
        self.log = PredictorLog()

    def parts(self):
        return self.models.artifact(self.params.spadec)

    def decoding_target(self) -> SkippingLM:
        return self.parts().target

    def proposer(self) -> Proposer:
        tree = Eagle2Params(head=self.params.spadec, total_tokens=self.params.total_tokens, depth=self.params.depth,
                            top_k=self.params.top_k)
        return TreeHeadProposer(self.parts().head, tree)

    def verifier(self) -> SpaDecVerifier:
        parts = self.parts()
        return SpaDecVerifier(self.params.split or parts.split,
                              predictor=parts.predictor if self.params.predictor == "on" else None,
                              scorer=parts.predictor, log=self.log)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Trace:
        self.log = PredictorLog()
        return super().generate(prompt_ids, max_new_tokens, sampling)

    def extras(self) -> dict[str, object]:
        return {**super().extras(), "deep_nodes": self.log.deep_nodes, "tree_nodes": self.log.tree_nodes,
                "predictor_auc": roc_auc(self.log.accepted, self.log.probabilities),
                "predictor_nodes": len(self.log.accepted)}
