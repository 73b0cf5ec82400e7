"""Cascade Speculative Drafting (Chen et al., "Cascade Speculative Drafting for Even Faster LLM Inference").

Levels, largest first: the target, the model drafts ``drafts``, and optionally
the statistical MaG draft at the bottom. The k-matrix has one row and column
per draft (MaG included). Row 0 drives the *horizontal cascade*: draft i keeps
adding tokens until ``k[0][0] + ... + k[0][i]`` tokens are drafted, and what
it adds is cut at that threshold, so one cascade drafts at most
``min(sum(k[0]), budget)`` tokens. A model draft i that has drafts below it
does not generate by itself: it *reviews* what the sub-cascade of drafts i+1..
proposes under ``k[i+1:, i+1:]`` (*vertical cascade*, itself bounded by its
own row 0 and by the room left below draft i's threshold minus the one token
draft i adds) and contributes the accepted prefix plus its own next token.
The lowest model draft (no MaG below it) generates autoregressively; MaG
proposes at most ``mag_tokens`` tokens per call, fewer where its threshold
needs fewer.

Review is greedy: a token is kept if it is the reviewer's argmax or, with
``lenience`` l > 1 and only for intermediate reviewers, if
``p_reviewer(token) > p_drafter(token) / l`` (the drafter's probability is 1
for MaG tokens). The target always reviews exactly, so the output equals the
target's greedy decoding. Every model keeps its KV cache across reviews and is
cropped back to the longest prefix it still agrees with.

Where the reference differs: there, the lowest model draft and MaG propose a
fixed 10 tokens per call and a reviewer adds its accepted prefix plus one,
whatever is left below the threshold, so a level can overshoot its row-0
threshold (with MaG as the only draft, ``[[5]]`` and ``[[10]]`` both draft 10
tokens a step). Here no level ever goes past its threshold: the lowest model
draft proposes exactly the tokens its threshold still needs, MaG at most
``mag_tokens`` of them, and a reviewer's sub-cascade is sized so that its
accepted prefix plus the reviewer's own token fit (the paper's k semantics).
This also makes ``drafts: [d], k_matrix: [[g]]`` identical to ``speculative``
with gamma g. The reference and paper define greedy review only, so
temperature > 0 is rejected.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harness.core.batched_lm import BatchedCausalLM, BatchPrefill
from harness.core.errors import ConfigError
from harness.core.lm import CausalLM, StepOutput
from harness.core.records import PromptRecord
from harness.core.tables import ReportView, markdown_table
from strategies.base import StrategyParams
from strategies.batched_engine import BatchCapable, BatchProposer
from strategies.engine import Proposer, ProposerStrategy
from strategies.ngram import BigramTable, mag_propose
from strategies.registry import register
from strategies.sampling import Sampling
from strategies.verification import Proposal, Verification

MAG = "mag"
MAG_TABLE = "mag-bigram"  # the implicit artefact's name in a cell's artefacts
COUNTERS = ("model_parameters", "fixed_ratios")


@dataclass(frozen=True)
class CascadeParams(StrategyParams):
    """``drafts`` (largest first) and ``k_matrix`` (one row/column per draft, MaG last when ``use_mag``)."""

    drafts: tuple[str, ...]
    k_matrix: tuple[tuple[int, ...], ...]
    use_mag: bool = False
    lenience: float = 1.0
    mag_tokens: int = 10
    mag_max_ngram: int = 8
    counter: str = "model_parameters"
    cost_ratios: dict[str, float] = field(default_factory=dict)

    def problems(self, where: str) -> Iterator[ConfigError]:
        size = len(self.drafts) + int(self.use_mag)
        k = self.k_matrix
        if size == 0:
            yield ConfigError(f"{where}.drafts", "no drafts", "name at least one model draft or set use_mag: true")
        if len(k) != size or any(len(row) != len(k) for row in k):
            shape = f"{len(k)}x{'/'.join(str(len(row)) for row in k) or 0}"
            yield ConfigError(f"{where}.k_matrix", f"must be square {size}x{size} (one row and column per draft"
                              f"{', MaG last' if self.use_mag else ''}), got {shape}",
                              "give one row per draft, each with one entry per draft")
        else:  # the entries are checked on a matrix of the right shape
            for i, row in enumerate(k):
                for j, value in enumerate(row):
                    if value < 0:
                        yield ConfigError(f"{where}.k_matrix", f"entry [{i}][{j}] is negative ({value})",
                                          "use counts >= 0")
                    if j < i and value != 0:
                        yield ConfigError(f"{where}.k_matrix", f"entry [{i}][{j}] below the diagonal is {value}",
                                          "entries below the diagonal must be 0 (a draft is only helped by smaller ones)")
            if k and sum(k[0]) < 1:
                yield ConfigError(f"{where}.k_matrix", "row 0 drafts no tokens",
                                  "make at least one entry of row 0 positive")
        if self.lenience < 1:
            yield ConfigError(f"{where}.lenience", f"must be >= 1, got {self.lenience}", "1 means exact review")
        if self.mag_tokens < 1 or self.mag_max_ngram < 1:
            yield ConfigError(f"{where}.mag_tokens", "mag_tokens and mag_max_ngram must be >= 1")
        if len(set(self.drafts)) != len(self.drafts):
            yield ConfigError(f"{where}.drafts", f"repeats a draft: {list(self.drafts)}", "list each draft once")
        if self.counter not in COUNTERS:
            yield ConfigError(f"{where}.counter", f"unknown counter {self.counter!r}", f"choose one of {', '.join(COUNTERS)}")
        if self.counter == "fixed_ratios":
            missing = [name for name in ("target", *self.drafts) if name not in self.cost_ratios]
            if missing:
                yield ConfigError(f"{where}.cost_ratios", f"no ratio for {missing[0]!r}",
                                  "give a cost ratio for target and every draft, e.g. {target: 1, small: 0.05}")

    def uses_drafts(self) -> list[str]:
        return list(self.drafts)

    def implicit_artifacts(self) -> dict[str, dict[str, Any]]:
        """MaG's bigram table, counted once per target by the driver (``training.bigram``)."""
        return {MAG_TABLE: {"kind": "bigram"}} if self.use_mag else {}

    def check_sampling(self, temperature: float, where: str) -> None:
        """Cascade review is greedy (as in the paper and its reference code)."""
        if temperature > 0:
            raise ConfigError(f"{where}.name", "cascade supports greedy decoding only",
                              "set run.temperature: 0, or use speculative for sampling")


@dataclass
class LevelStats:
    """Reviews done by one level and the drafted tokens it accepted."""

    reviews: int = 0
    proposed: int = 0
    accepted: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"reviews": self.reviews, "proposed": self.proposed, "accepted": self.accepted}


@dataclass(frozen=True)
class LogitsRequest:
    """What the cascade needs next from model draft ``level``: its logits at positions ``start ..
    len(sequence) - 1`` of ``sequence``."""

    level: int
    sequence: list[int]
    start: int


Drafting = Generator[LogitsRequest, torch.Tensor, tuple[list[int], list[torch.Tensor | None]]]


class CachedModel:
    """A ``CausalLM`` plus the token ids its KV cache holds, so any sequence can reuse their common prefix."""

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm
        self.tokens: list[int] = []

    def start(self, prompt: list[int]) -> None:
        self.lm.prefill(prompt)
        self.tokens = list(prompt)

    def logits_from(self, sequence: list[int], start: int) -> torch.Tensor:
        """The model's logits at positions ``start .. len(sequence)-1`` of ``sequence`` (one forward at most)."""
        if start == len(sequence) - 1 and self.tokens == sequence and self.lm.last_logits is not None:
            return self.lm.last_logits[None]
        keep = min(common_prefix(self.tokens, sequence), start)
        if keep == 0:
            logits = self.lm.prefill(sequence, all_logits=True).logits
        else:
            self.lm.crop(keep)
            logits = self.lm.extend(sequence[keep:]).logits
        self.tokens = list(sequence)
        return logits[start - keep:]


class BatchedCachedModel:
    """``CachedModel`` for a batch: a ``BatchedCausalLM`` plus the token ids each row's cache holds; one batched
    forward serves the requests of several rows."""

    def __init__(self, lm: BatchedCausalLM) -> None:
        self.lm = lm
        self.tokens: list[list[int]] = []

    def start(self, prompts: list[list[int]]) -> None:
        self.lm.prefill(prompts)
        self.tokens = [list(prompt) for prompt in prompts]

    def logits_from(self, requests: dict[int, LogitsRequest]) -> dict[int, torch.Tensor]:
        """Per requesting row, the logits ``CachedModel.logits_from`` gives for its request, in one forward at most
        (rows that asked for nothing take no part)."""
        answers: dict[int, torch.Tensor] = {}
        lengths, feeds, keeps = self.lm.lengths, [[] for _ in self.tokens], {}
        for row, request in requests.items():
            sequence, start = request.sequence, request.start
            if start == len(sequence) - 1 and self.tokens[row] == sequence:
                answers[row] = self.lm.last_logits[row][None]
                continue
            keep = min(common_prefix(self.tokens[row], sequence), start)
            keeps[row], lengths[row], feeds[row] = keep, keep, sequence[keep:]
            self.tokens[row] = list(sequence)
        if keeps:
            self.lm.crop(lengths)
            out = self.lm.extend(feeds)
            for row, keep in keeps.items():
                answers[row] = out.row(row)[requests[row].start - keep:]
        return answers


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low], and the first difference lies below high
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class CascadeDrafting:
    """The cascade below the target for one sequence, written as a generator of ``LogitsRequest`` s: it yields
    what it needs from a model draft and is sent the logits, so the same cascade runs against one row's caches
    (``answer_alone``) or, in lockstep with other rows, against batched ones (``BatchedCascadeProposer``).

    Intermediate model drafts are lenient verifiers of the sub-cascades below them (``_review``); the target's
    exact review is the shared verifier. ``stats`` counts each level's reviews.
    """

    def __init__(self, params: "CascadeParams", table: BigramTable | None) -> None:
        self.params, self.table = params, table
        self.k = torch.tensor(params.k_matrix, dtype=torch.long)
        self.levels: list[int | str] = [*range(len(params.drafts)), *([MAG] if params.use_mag else [])]

    def new_stats(self) -> dict[str, LevelStats]:
        """Empty review counts for the target and every model draft."""
        return {name: LevelStats() for name in ("target", *self.params.drafts)}

    def draft(self, context: list[int], limit: int, stats: dict[str, LevelStats]) -> Drafting:
        """At most ``min(sum(k[0]), limit)`` tokens drafted after ``context`` (with one distribution, or ``None``
        for MaG, per token)."""
        return self._cascade(self.levels, self.k, context, limit, stats)

    def _cascade(self, levels: list[int | str], k: torch.Tensor, context: list[int], limit: int,
                 stats: dict[str, LevelStats]) -> Drafting:
        """Tokens drafted by ``levels`` under k-matrix ``k`` (row 0: horizontal thresholds), at most ``limit``.

        Level i adds tokens only while fewer than ``min(k[0][0] + ... + k[0][i], limit)``
        are drafted, and never more than that threshold still needs, so at most
        ``min(sum(k[0]), limit)`` tokens come back.
        """
        tokens: list[int] = []
        probs: list[torch.Tensor | None] = []
        row = k[0].tolist()
        for index, drafter in enumerate(levels):
            threshold = min(sum(row[: index + 1]), limit)
            while len(tokens) < threshold:
                sequence = context + tokens
                need = threshold - len(tokens)
                if drafter == MAG:
                    new = mag_propose(sequence, min(self.params.mag_tokens, need), self.table,
                                      self.params.mag_max_ngram)
                    new_probs: list[torch.Tensor | None] = [None] * len(new)
                elif index == len(levels) - 1:
                    new, new_probs = yield from self._autoregressive(drafter, sequence, need)
                else:
                    # the sub-cascade leaves room for the reviewer's own next token within the threshold
                    room = need - 1
                    sub, sub_probs = (yield from self._cascade(levels[index + 1:], k[index + 1:, index + 1:],
                                                               sequence, room, stats)) if room > 0 else ([], [])
                    accepted, following, rows = yield from self._review(drafter, sequence, sub, sub_probs, stats)
                    new, new_probs = sub[:accepted] + [following], list(rows)
                tokens.extend(new[:need])
                probs.extend(new_probs[:need])
        return tokens, probs

    @staticmethod
    def _autoregressive(level: int, context: list[int], count: int) -> Drafting:
        """The lowest model draft: ``count`` greedy tokens, with its distributions (for lenience above it)."""
        logits = (yield LogitsRequest(level, context, len(context) - 1))[-1]
        tokens, probs = [], []
        for index in range(count):
            token = int(logits.argmax())
            tokens.append(token)
            probs.append(torch.softmax(logits, -1))
            if index + 1 < count:
                sequence = context + tokens
                logits = (yield LogitsRequest(level, sequence, len(sequence) - 1))[-1]
        return tokens, probs

    def _review(self, level: int, context: list[int], proposal: list[int], probs: list[torch.Tensor | None],
                stats: dict[str, LevelStats]) -> Generator[LogitsRequest, torch.Tensor,
                                                           tuple[int, int, list[torch.Tensor]]]:
        """Greedy (lenient) review of ``proposal``: (accepted count, the reviewer's next token, its distributions)."""
        lenience = self.params.lenience
        logits = yield LogitsRequest(level, context + proposal, len(context) - 1)
        best = logits.argmax(-1).tolist()
        distributions = torch.softmax(logits, -1) if lenience > 1 else None
        accepted = 0
        for position, token in enumerate(proposal):
            if best[position] == token:
                accepted += 1
                continue
            if distributions is not None:
                drafted_p = 1.0 if probs[position] is None else float(probs[position][token])
                if float(distributions[position, token]) > drafted_p / lenience:
                    accepted += 1
                    continue
            break
        counts = stats[self.params.drafts[level]]
        counts.reviews += 1
        counts.proposed += len(proposal)
        counts.accepted += accepted
        if distributions is None:
            distributions = torch.softmax(logits[: accepted + 1], -1)
        return accepted, best[accepted], list(distributions[: accepted + 1])


def answer_alone(drafting: Drafting, models: list[CachedModel]) -> list[int]:
    """Run one row's cascade to its end, answering each request from that row's own cached models."""
    try:
        request = next(drafting)
        while True:
            request = drafting.send(models[request.level].logits_from(request.sequence, request.start))
    except StopIteration as finished:
        return finished.value[0]


class CascadeProposer(Proposer):
    """The whole cascade below the target: a draft of at most ``min(sum(k[0]), budget)`` tokens per step."""

    def __init__(self, params: "CascadeParams", drafts: dict[str, CausalLM], table: BigramTable | None) -> None:
        self.params, self.draft_models = params, drafts
        self.cascade = CascadeDrafting(params, table)
        self.stats: dict[str, LevelStats] = {}
        self.proposed = 0
        self.drafts: list[CachedModel] = []

    def begin(self, prompt_ids: list[int], prefill: StepOutput, sequence: list[int]) -> None:
        self.drafts = [CachedModel(self.draft_models[name]) for name in self.params.drafts]
        for model in self.drafts:
            model.start(prompt_ids)
        self.stats = self.cascade.new_stats()

    def propose(self, sequence: list[int], budget: int, sampling: Sampling) -> Proposal:
        tokens = answer_alone(self.cascade.draft(sequence, budget, self.stats), self.drafts) if budget > 0 else []
        self.proposed = len(tokens)
        return Proposal(tokens)

    def observe(self, sequence: list[int], verification: Verification) -> None:
        count_target_review(self.stats, self.proposed, verification.accepted)

    def models(self) -> dict[str, CausalLM]:
        return {f"draft:{name}": self.draft_models[name] for name in self.params.drafts}

    def extras(self) -> dict[str, Any]:
        return {"levels": {name: stats.as_dict() for name, stats in self.stats.items()}}


def count_target_review(stats: dict[str, LevelStats], proposed: int, accepted: int) -> None:
    """Count the target's exact review of a step like the drafts' reviews in ``CascadeDrafting._review``."""
    target = stats["target"]
    target.reviews += 1
    target.proposed += proposed
    target.accepted += accepted


class BatchedCascadeProposer(BatchProposer):
    """``CascadeProposer`` for a batch: every row runs its own cascade (the same ``CascadeDrafting``, so the same
    reviews and tokens as alone), in lockstep; requests to one model draft from several rows share one batched
    forward.

    Scheduling: while any row waits, the smallest model draft that some row waits on (the last in ``drafts``)
    is served, so rows that wait on a larger reviewer gather until every row is there and the reviewer runs
    once for all of them.
    """

    def __init__(self, params: "CascadeParams", drafts: dict[str, BatchedCausalLM], table: BigramTable | None) -> None:
        self.params, self.draft_models = params, drafts
        self.cascade = CascadeDrafting(params, table)
        self.drafts: list[BatchedCachedModel] = []
        self.stats: list[dict[str, LevelStats]] = []
        self.proposed: list[int] = []

    def begin(self, prompts: list[list[int]], prefill: BatchPrefill) -> None:
        self.drafts = [BatchedCachedModel(self.draft_models[name]) for name in self.params.drafts]
        for model in self.drafts:
            model.start(prompts)
        self.stats = [self.cascade.new_stats() for _ in prompts]
        self.proposed = [0] * len(prompts)

    def propose(self, sequences: list[list[int]], budgets: list[int], sampling: Sampling) -> list[Proposal]:
        tokens: list[list[int]] = [[] for _ in sequences]
        running = {row: self.cascade.draft(sequence, budget, self.stats[row])
                   for row, (sequence, budget) in enumerate(zip(sequences, budgets)) if budget > 0}
        waiting: dict[int, LogitsRequest] = {}

        def advance(row: int, answer: torch.Tensor | None) -> None:
            try:
                waiting[row] = running[row].send(answer)  # type: ignore[arg-type]  (None starts a generator)
            except StopIteration as finished:
                tokens[row] = finished.value[0]
                waiting.pop(row, None)

        for row in running:
            advance(row, None)
        while waiting:
            level = max(request.level for request in waiting.values())
            served = {row: request for row, request in waiting.items() if request.level == level}
            for row, logits in self.drafts[level].logits_from(served).items():
                advance(row, logits)
        self.proposed = [len(row_tokens) for row_tokens in tokens]
        return [Proposal(row_tokens) for row_tokens in tokens]

    def observe(self, sequences: list[list[int]], verifications: list[Verification | None]) -> None:
        for row, verification in enumerate(verifications):
            if verification is not None:
                count_target_review(self.stats[row], self.proposed[row], verification.accepted)

    def models(self) -> dict[str, BatchedCausalLM]:
        return {f"draft:{name}": self.draft_models[name] for name in self.params.drafts}

    def row_extras(self, row: int) -> dict[str, Any]:
        return {"levels": {name: stats.as_dict() for name, stats in self.stats[row].items()}}


# ---------------------------------------------------------------------------- stats and report section


def level_summary(prompts: list[PromptRecord]) -> dict[str, dict[str, float]]:
    """Per cascade level: reviews, acceptance rate and tokens per review (τ of that level), pooled over prompts."""
    totals: dict[str, dict[str, float]] = {}
    for prompt in prompts:
        for turn in prompt.turns:
            for name, level in turn.strategy.extras.get("levels", {}).items():
                entry = totals.setdefault(name, {"reviews": 0, "proposed": 0, "accepted": 0})
                for key in entry:
                    entry[key] += level[key]
    return {name: {"reviews": t["reviews"],
                   "alpha": t["accepted"] / t["proposed"] if t["proposed"] else None,
                   "tau": (t["accepted"] + t["reviews"]) / t["reviews"] if t["reviews"] else None}
            for name, t in totals.items()}


def cascade_section(view: ReportView) -> list[str]:
    """CS Drafting: best k-matrix vs best single-draft speculative, per-level τ/α, heatmaps over row 0."""
    groups, run_dir = view.groups, view.run_dir
    cascades = groups[groups["strategy"] == "cascade"]
    if cascades.empty:
        return []
    means = groups.groupby(["strategy", "params"], as_index=False)[["speedup", "cost_speedup", "tau"]].mean()
    lines = ["## CS Drafting", ""]
    cascade_means = means[means["strategy"] == "cascade"]
    best_cost = cascade_means.loc[cascade_means["cost_speedup"].idxmax()]
    best_wall = cascade_means.loc[cascade_means["speedup"].idxmax()]
    lines.append(f"- best k-matrix by cost speedup: `{best_cost.params}`: cost speedup {best_cost.cost_speedup:.2f}, "
                 f"wall speedup {best_cost.speedup:.2f} (means over prompt sets)")
    lines.append(f"- best k-matrix by wall speedup: `{best_wall.params}`: wall speedup {best_wall.speedup:.2f}, "
                 f"cost speedup {best_wall.cost_speedup:.2f}")
    single = means[means["strategy"] == "speculative"]
    if not single.empty:
        best_single = single.loc[single["cost_speedup"].idxmax()]
        verdict = "beats" if best_cost.cost_speedup > best_single.cost_speedup else "does not beat"
        lines.append(f"- best single-draft speculative by cost speedup: `{best_single.params}`: "
                     f"{best_single.cost_speedup:.2f} (wall {best_single.speedup:.2f}); the best cascade {verdict} it")
    lines += ["", "Per-level acceptance of the best k-matrix (by cost), pooled over prompt sets:", ""]
    level_rows = []
    for _, row in cascades[cascades["params"] == best_cost.params].iterrows():
        for name, level in row["levels"].items():
            level_rows.append({"prompt_set": row["prompt_set"], "level": name, **level})
    lines += [markdown_table(pd.DataFrame(level_rows), {"prompt_set": "prompt set", "level": "reviewer",
                                                        "reviews": "reviews", "tau": "τ (tokens per review)",
                                                        "alpha": "α (accepted / proposed)"}), ""]
    figures = plot_kmatrix_heatmaps(cascades, run_dir)
    lines += [f"![{path.stem}]({path.name})" for path in figures] + [""]
    return lines


def plot_kmatrix_heatmaps(cascades: pd.DataFrame, run_dir: Path) -> list[Path]:
    """Heatmaps of mean cost and wall speedup over (k[0][0], k[0][1]), one per cascade family (drafts, MaG, lenience)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for params, frame in cascades.groupby("params"):
        raw = frame["params_raw"].iloc[0]
        if len(raw["k_matrix"][0]) < 2:
            continue
        family = f"drafts={'+'.join(raw['drafts']) or '-'}{'+MaG' if raw.get('use_mag') else ''}, " \
                 f"lenience={raw.get('lenience', 1.0)}"
        rows.append({"family": family, "k00": raw["k_matrix"][0][0], "k01": raw["k_matrix"][0][1],
                     "speedup": frame["speedup"].mean(), "cost_speedup": frame["cost_speedup"].mean()})
    if not rows:
        return []
    table = pd.DataFrame(rows)
    paths = []
    for index, (family, frame) in enumerate(table.groupby("family")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric in zip(axes, ("cost_speedup", "speedup")):
            grid = frame.pivot_table(index="k00", columns="k01", values=metric, aggfunc="max")
            image = ax.imshow(grid.values, cmap="viridis", origin="lower")
            ax.set_xticks(range(len(grid.columns)), grid.columns)
            ax.set_yticks(range(len(grid.index)), grid.index)
            ax.set_xlabel("k[0][1] (tokens from the second draft)")
            ax.set_ylabel("k[0][0] (tokens from the first draft)")
            ax.set_title(f"{'cost' if metric == 'cost_speedup' else 'wall'} speedup")
            for (i, j), value in pd.DataFrame(grid.values).stack().items():
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=9)
            fig.colorbar(image, ax=ax)
        fig.suptitle(family)
        fig.tight_layout()
        path = run_dir / f"kmatrix_heatmap_{index}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


@register("cascade")
class Cascade(ProposerStrategy, BatchCapable):
    """CS Drafting: k-matrix cascades of model drafts (and MaG), reviewed greedily up to the target."""

    Params = CascadeParams
    report_section = staticmethod(cascade_section)

    @classmethod
    def pooled_stats(cls, prompts: list[PromptRecord]) -> dict[str, Any]:
        return {"levels": level_summary(prompts)}

    def proposer(self) -> Proposer:
        table = self.models.artifact(MAG_TABLE) if self.params.use_mag else None
        return CascadeProposer(self.params, {name: self.models.draft(name) for name in self.params.drafts}, table)

    def batch_proposer(self) -> BatchProposer:
        table = self.models.artifact(MAG_TABLE) if self.params.use_mag else None
        return BatchedCascadeProposer(self.params, {name: BatchedCausalLM.of(self.models.draft(name))
                                                    for name in self.params.drafts}, table)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling):
        if not sampling.greedy:
            raise ValueError("cascade supports greedy decoding only")
        return super().generate(prompt_ids, max_new_tokens, sampling)

    def cost_units(self, forward: dict[str, dict[str, float]]) -> float:
        """``model_parameters``: Σ calls × parameters; ``fixed_ratios``: Σ calls × the given ratio. MaG costs 0."""
        if self.params.counter == "model_parameters":
            return super().cost_units(forward)
        return float(sum(stats["calls"] * self.params.cost_ratios[role.split(":", 1)[-1]]
                         for role, stats in forward.items()))
